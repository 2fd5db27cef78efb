"""End-to-end trainer tests on the embedded digits dataset with a tiny model."""

import json
import logging
import os
import shutil
import signal
from pathlib import Path

import jax
import numpy as np
import pytest

from effformer.train import NonFiniteLossError, evaluate, train_and_evaluate
from effformer.train.checkpoint import Checkpointer, load_config
from effformer.train.experiment import build_experiment
from effformer.train.metric_writers import read_metrics


def _losses(workdir) -> list[float]:
    return [r["loss"] for r in read_metrics(workdir, "train")]


def _restore_params(config, workdir, step=None):
    exp = build_experiment(config)
    checkpointer = Checkpointer(workdir)
    try:
        restored_step, state, data_state = checkpointer.restore(exp.abstract_state, step=step)
    finally:
        checkpointer.close()
    return restored_step, jax.device_get(state.params), data_state


def test_train_then_eval_round_trip(baseline_run):
    config, workdir, result = baseline_run
    assert result["step"] == 6
    assert set(result["eval"]) == {"loss", "accuracy"}
    reloaded = evaluate(workdir)
    assert reloaded["step"] == 6
    assert reloaded["accuracy"] == result["eval"]["accuracy"]
    assert reloaded["loss"] == result["eval"]["loss"]
    assert (workdir / "config.json").is_file()
    assert list((workdir / "tb").iterdir()), "TensorBoard event file missing"
    # Running train again on a finished workdir reports the same final evaluation.
    again = train_and_evaluate(config, workdir)
    assert again["eval"] == result["eval"]


def test_resume_is_bitwise_exact(baseline_run, tmp_path):
    config, straight_dir, _ = baseline_run
    partial = train_and_evaluate(config, tmp_path, stop_after_steps=3)
    assert partial["step"] == 3 and partial["eval"] == {}
    train_and_evaluate(config, tmp_path)
    _, straight, straight_data = _restore_params(config, straight_dir)
    _, resumed, resumed_data = _restore_params(config, tmp_path)
    for a, b in zip(jax.tree.leaves(straight), jax.tree.leaves(resumed), strict=True):
        np.testing.assert_array_equal(a, b)
    assert straight_data == resumed_data
    assert _losses(straight_dir) == _losses(tmp_path)


def test_same_seed_same_losses_and_other_seed_differs(baseline_run, make_config, tmp_path):
    config, baseline_dir, _ = baseline_run
    train_and_evaluate(config, tmp_path / "same")
    train_and_evaluate(make_config(log_every_steps=1, seed=1), tmp_path / "other")
    assert _losses(baseline_dir) == _losses(tmp_path / "same")
    assert _losses(baseline_dir) != _losses(tmp_path / "other")


def test_one_device_and_eight_devices_agree(baseline_run, make_config, tmp_path):
    assert jax.device_count() == 8
    _, eight_dir, _ = baseline_run  # The baseline uses all 8 devices.
    train_and_evaluate(make_config(log_every_steps=1, mesh__num_devices=1), tmp_path)
    np.testing.assert_allclose(_losses(tmp_path), _losses(eight_dir), rtol=1e-5)


def test_fsdp_mesh_matches_data_parallel(baseline_run, make_config, tmp_path):
    _, data_parallel_dir, _ = baseline_run
    train_and_evaluate(make_config(log_every_steps=1, mesh__fsdp=4), tmp_path)
    np.testing.assert_allclose(_losses(tmp_path), _losses(data_parallel_dir), rtol=1e-5)


def test_gradient_accumulation_equals_full_batch(make_config, tmp_path):
    # Dropout differs between micro-batches by design, so compare without it.
    full = make_config(log_every_steps=1, num_train_steps=3)
    accum = make_config(log_every_steps=1, num_train_steps=3, grad_accum_steps=2)
    for config in (full, accum):
        config.model.kwargs.dropout = 0.0
    train_and_evaluate(full, tmp_path / "full")
    train_and_evaluate(accum, tmp_path / "accum")
    _, a, _ = _restore_params(full, tmp_path / "full")
    _, b, _ = _restore_params(accum, tmp_path / "accum")
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


def test_sigterm_saves_and_stops(make_config, tmp_path):
    config = make_config(num_train_steps=10)

    def send_sigterm(step, metrics):
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    result = train_and_evaluate(config, tmp_path, on_step=send_sigterm)
    assert result["step"] == 3
    step, _, _ = _restore_params(config, tmp_path)
    assert step == 3
    assert train_and_evaluate(config, tmp_path)["step"] == 10


def test_ctrl_c_saves_and_stops_and_a_second_one_interrupts(make_config, tmp_path):
    # With checkpoint.every_steps = 0 (the default) a Ctrl-C used to lose the whole run.
    config = make_config(num_train_steps=10)
    before = signal.getsignal(signal.SIGINT)

    def send_sigint(step, metrics):
        if step == 3:
            os.kill(os.getpid(), signal.SIGINT)

    assert train_and_evaluate(config, tmp_path / "once", on_step=send_sigint)["step"] == 3
    assert _restore_params(config, tmp_path / "once")[0] == 3
    assert signal.getsignal(signal.SIGINT) is before  # the handler is restored

    def send_two(step, metrics):
        if step == 3:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(KeyboardInterrupt):
        train_and_evaluate(config, tmp_path / "twice", on_step=send_two)
    assert not (tmp_path / "twice" / "checkpoints" / "3").exists()  # stopped without saving
    assert signal.getsignal(signal.SIGINT) is before


def test_steps_run_again_after_a_kill_are_recorded_once(make_config, tmp_path):
    # A run killed after its step-4 checkpoint had logged steps 5 and 6; resuming from 4
    # runs them again. metrics.jsonl used to hold them twice.
    config = make_config(num_train_steps=6)
    config.log_every_steps = 1
    config.checkpoint.every_steps = 2
    config.checkpoint.keep = 3
    train_and_evaluate(config, tmp_path)
    shutil.rmtree(tmp_path / "checkpoints" / "6")  # as if killed before saving step 6
    before = read_metrics(tmp_path, "train")
    assert train_and_evaluate(config, tmp_path)["step"] == 6
    after = read_metrics(tmp_path, "train")
    assert [r["step"] for r in after] == [1, 2, 3, 4, 5, 6]
    # Steps up to the checkpoint keep their first records; 5 and 6 are the new run's.
    assert after[:4] == before[:4]
    assert [r["step"] for r in read_metrics(tmp_path, "eval")] == [6]


def test_a_finished_run_keeps_the_config_it_trained_with(make_config, tmp_path):
    # Re-running `train` on a finished workdir trains no step; its config used to replace
    # config.json, which eval and resume read as the run's.
    config = make_config(num_train_steps=2)
    train_and_evaluate(config, tmp_path)
    changed = make_config(num_train_steps=2)
    changed.optimizer.learning_rate = 0.5
    assert train_and_evaluate(changed, tmp_path)["step"] == 2
    assert load_config(tmp_path).optimizer.learning_rate == config.optimizer.learning_rate
    longer = make_config(num_train_steps=3)  # trains a step: its config is the run's now
    assert train_and_evaluate(longer, tmp_path)["step"] == 3
    assert load_config(tmp_path).num_train_steps == 3


def test_corrupt_latest_checkpoint_falls_back_to_previous(make_config, tmp_path, caplog):
    config = make_config(num_train_steps=4)
    config.checkpoint.every_steps = 2
    config.checkpoint.keep = 3
    train_and_evaluate(config, tmp_path)
    latest = tmp_path / "checkpoints" / "4" / "state"
    for path in latest.rglob("*"):
        if path.is_file():
            path.write_bytes(b"garbage")
    with caplog.at_level(logging.ERROR):
        metrics = evaluate(tmp_path)
    assert metrics["step"] == 2
    assert "checkpoints/4" in caplog.text
    # A reader leaves the workdir alone (a training run may be writing there) ...
    assert (tmp_path / "checkpoints" / "4").is_dir()
    # ... the run that owns it moves the damaged checkpoint aside when it resumes.
    assert train_and_evaluate(make_config(num_train_steps=6), tmp_path)["step"] == 6
    assert (tmp_path / "checkpoints" / "4.corrupt").is_dir()


def test_a_checkpoint_deleted_while_eval_reads_it_is_skipped(make_config, tmp_path, monkeypatch):
    # `effformer eval` beside a running training: the run's retention policy deletes a
    # step while eval reads it. Eval used to report it corrupt and rename it (a
    # FileNotFoundError, or a training run that then failed to delete its own step).
    config = make_config(num_train_steps=4)
    config.checkpoint.every_steps = 2
    config.checkpoint.keep = 3
    train_and_evaluate(config, tmp_path)
    original = Checkpointer._restore_step

    def deleted_meanwhile(self, step, abstract_state):
        if step == 4:
            shutil.rmtree(self.directory / "4")
            raise FileNotFoundError(f"{self.directory / '4'} vanished")
        return original(self, step, abstract_state)

    monkeypatch.setattr(Checkpointer, "_restore_step", deleted_meanwhile)
    assert evaluate(tmp_path)["step"] == 2
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["2"]


def test_a_run_killed_while_writing_its_config_keeps_the_previous_one(
    make_config, tmp_path, monkeypatch
):
    from effformer.train.checkpoint import save_config

    save_config(make_config(num_train_steps=2), tmp_path)
    write_text = Path.write_text

    def killed_halfway(self, text, *args, **kwargs):
        write_text(self, text[: len(text) // 2], *args, **kwargs)
        raise KeyboardInterrupt  # as kill -9 would stop it, mid-write

    monkeypatch.setattr(Path, "write_text", killed_halfway)
    with pytest.raises(KeyboardInterrupt):
        save_config(make_config(num_train_steps=4), tmp_path)
    monkeypatch.undo()
    assert load_config(tmp_path).num_train_steps == 2


def test_a_checkpoint_restoring_non_finite_values_is_corrupt(make_config, tmp_path, caplog):
    # A flipped bit in an array file restores without an error; the trainer never saves a
    # non-finite state, so NaN in a restored one marks damaged files.
    config = make_config(num_train_steps=2)
    config.checkpoint.every_steps = 1
    train_and_evaluate(config, tmp_path)
    exp = build_experiment(config)
    checkpointer = Checkpointer(tmp_path, config.checkpoint)
    _, state, data_state = checkpointer.restore(exp.abstract_state)
    damaged = state.replace(params=jax.tree.map(lambda x: x * np.nan, state.params))
    checkpointer.save(3, damaged, data_state)
    checkpointer.close()
    with caplog.at_level(logging.ERROR):
        assert evaluate(tmp_path)["step"] == 2
    assert "restored NaN or infinite values" in caplog.text


def test_a_run_restores_on_a_machine_where_its_mesh_cannot_be_built(make_config, tmp_path):
    # As if trained with FSDP over 16 accelerators, evaluated here on 8 devices.
    config = make_config(num_train_steps=2)
    config.mesh.fsdp = 2
    result = train_and_evaluate(config, tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    saved["mesh"].update(num_devices=16, fsdp=16)
    (tmp_path / "config.json").write_text(json.dumps(saved))
    metrics = evaluate(tmp_path)
    assert metrics == pytest.approx({"step": 2, **result["eval"]}, rel=1e-6)


def test_with_a_best_metric_every_evaluation_is_saved_as_a_candidate(
    make_config, tmp_path, monkeypatch
):
    config = make_config(num_train_steps=6, eval_every_steps=2)
    config.checkpoint.every_steps = 3  # not a multiple of eval_every_steps
    config.checkpoint.best_metric = "accuracy"
    saves = []
    original = Checkpointer.save

    def record(self, step, state, data_state, metrics=None):
        saves.append((step, metrics is not None))
        return original(self, step, state, data_state, metrics)

    monkeypatch.setattr(Checkpointer, "save", record)
    train_and_evaluate(config, tmp_path)
    # Every evaluation (2, 4, 6) is saved with its metrics; 3 is a plain periodic save.
    assert saves == [(2, True), (3, False), (4, True), (6, True)]


def test_every_checkpoint_corrupt_is_an_error_not_a_silent_restart(make_config, tmp_path):
    config = make_config(num_train_steps=4)
    config.checkpoint.every_steps = 2
    config.checkpoint.keep = 3
    train_and_evaluate(config, tmp_path)
    (tmp_path / "checkpoints" / "2.corrupt").mkdir()  # step 2 failed once before
    for path in (tmp_path / "checkpoints").glob("[0-9]*/state/**/*"):
        if path.is_file():
            path.write_bytes(b"garbage")
    with pytest.raises(
        RuntimeError, match=r"Every checkpoint .* failed to restore: step 4 .*step 2"
    ):
        train_and_evaluate(make_config(num_train_steps=6), tmp_path)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["2.corrupt", "2.corrupt.1", "4.corrupt"]


def test_resume_with_a_config_that_changes_the_state_is_refused(make_config, tmp_path):
    # Not corruption: the checkpoints must stay, and training must not restart from step 0.
    train_and_evaluate(make_config(num_train_steps=2), tmp_path)
    changed = make_config(num_train_steps=4)
    changed.optimizer.name = "sgd"  # Another optimizer state.
    with pytest.raises(ValueError, match=r"checkpoints/2 does not hold the train state.*opt_state"):
        train_and_evaluate(changed, tmp_path)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["2"]
    assert load_config(tmp_path).optimizer.name == "adamw"
    assert evaluate(tmp_path)["step"] == 2


def test_non_finite_loss_stops_and_keeps_last_checkpoint(make_config, tmp_path):
    config = make_config(num_train_steps=40)
    config.checkpoint.every_steps = 1
    config.optimizer.name = "sgd"
    config.optimizer.learning_rate = 1e12
    with pytest.raises(NonFiniteLossError, match="at step"):
        train_and_evaluate(config, tmp_path)
    step, params, _ = _restore_params(config, tmp_path)
    assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(params))
    assert step >= 1


def test_a_non_finite_state_after_a_finite_loss_is_not_saved(make_config, tmp_path):
    # NaN gradients with a finite loss: step 1's loss is finite, its updated parameters
    # are NaN; the checkpoint of step 1 must not be written (only step 2's loss shows it).
    config = make_config(num_train_steps=4, model__name="test_nan_gradient_classifier")
    config.checkpoint.every_steps = 1
    with pytest.raises(NonFiniteLossError, match="state after step 1 holds NaN.*no checkpoint"):
        train_and_evaluate(config, tmp_path)
    assert not list((tmp_path / "checkpoints").glob("[0-9]*"))


def test_model_schedule_reaches_the_model(make_config, tmp_path):
    config = make_config(num_train_steps=4, log_every_steps=1)
    config.model_schedules.scale = dict(
        kind="linear", start=1.0, end=0.0, cutoff_steps=4, eval_value=1.0
    )
    seen = []
    train_and_evaluate(config, tmp_path, on_step=lambda step, m: seen.append(m["schedule/scale"]))
    np.testing.assert_allclose(seen, [1.0, 0.75, 0.5, 0.25])


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(model__name="no_such_model"), "config.model.name"),
        (dict(data__name="no_such_data"), "config.data.name"),
        (dict(task__name="no_such_task"), "config.task.name"),
        (dict(optimizer__name="adamax_typo"), "config.optimizer.name"),
        (dict(global_batch_size=30), "divisible by the 8 devices"),
        (dict(global_batch_size=0), "config.global_batch_size is required"),
        (dict(num_epochs=1.0), "exactly one of"),
        (dict(log_every_steps=0), r"config.log_every_steps must be >= 1, got 0"),
        (dict(eval_batch_size=-8), r"config.eval_batch_size must be >= 0, got -8"),
        (dict(checkpoint__every_steps=-2), r"config.checkpoint.every_steps must be >= 0"),
        (dict(num_epochs=1.0, num_train_steps=-1), r"config.num_train_steps must be >= 0"),
        # A typo in a closed section used to leave the default in force without a word.
        (
            dict(optimizer__warmup_step=5),
            r"config.optimizer.warmup_step is not a field .* did you mean 'warmup_steps'",
        ),
        (dict(checkpoint__every=2), r"config.checkpoint.every is not a field"),
        (dict(seed=-1), r"config.seed must be an int in \[0, 2\*\*32\), got -1"),
        (
            dict(checkpoint__best_metric="acc"),
            r"best_metric must be one of the eval metrics \['accuracy', 'loss'\].*got 'acc'",
        ),
    ],
)
def test_bad_config_fails_before_training(make_config, tmp_path, changes, message):
    with pytest.raises(ValueError, match=message):
        train_and_evaluate(make_config(**changes), tmp_path)
    assert not (Path(tmp_path) / "checkpoints").exists()


def test_a_negative_batch_size_is_named(make_config, tmp_path):
    # It used to fail on config.optimizer.warmup_steps (a negative epoch length).
    config = make_config(num_train_steps=0, num_epochs=1.0, global_batch_size=-8)
    with pytest.raises(ValueError, match=r"config.global_batch_size must be >= 1, got -8"):
        train_and_evaluate(config, tmp_path)


def test_eval_batch_size_is_checked_before_training(make_config, tmp_path):
    # First used by the first evaluation, at the end of this run.
    with pytest.raises(ValueError, match=r"eval batch size .* = 12 must be divisible by the 8"):
        train_and_evaluate(make_config(eval_batch_size=12), tmp_path)
    assert not (tmp_path / "checkpoints").exists()


def test_a_mesh_that_does_not_split_the_processes_equally_is_refused(make_config, monkeypatch):
    # Each process feeds 1/process_count of every batch (eval batches included, which are
    # first used at the end of a run): a process without devices in the mesh, or with
    # more than another, could not place its share. Here 2 processes, all devices on one.
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    with pytest.raises(ValueError, match=r"spread equally over the 2 processes.*\{0: 8\}"):
        build_experiment(make_config())


def test_workdir_of_another_model_is_refused(make_config, tmp_path):
    train_and_evaluate(make_config(num_train_steps=2), tmp_path)
    other = make_config(num_train_steps=2)
    other.model.kwargs.hidden = 32
    with pytest.raises(ValueError, match="config.model.kwargs"):
        train_and_evaluate(other, tmp_path)


def test_ema_parameters_are_kept_and_used_for_eval(make_config, tmp_path):
    from effformer.train.evaluate import run_evaluation

    config = make_config(num_train_steps=4, ema_decay=0.5)
    result = train_and_evaluate(config, tmp_path)
    exp = build_experiment(config)
    checkpointer = Checkpointer(tmp_path)
    try:
        _, state, _ = checkpointer.restore(exp.abstract_state)
    finally:
        checkpointer.close()
    params, ema = jax.tree.leaves(state.params), jax.tree.leaves(state.ema_params)
    assert any(not np.array_equal(p, e) for p, e in zip(params, ema, strict=True))
    assert run_evaluation(exp, state.ema_params) == result["eval"]


def test_evaluation_reuses_its_jitted_step_and_a_replaced_experiment_does_not(
    make_config, monkeypatch
):
    import dataclasses
    import importlib

    # The module (effformer.train re-exports a function under its name).
    evaluate = importlib.import_module("effformer.train.evaluate")
    built = []
    make = evaluate.make_eval_step
    monkeypatch.setattr(evaluate, "make_eval_step", lambda *args: built.append(1) or make(*args))
    exp = build_experiment(make_config(num_train_steps=4))
    state = exp.init_state()
    first = evaluate.run_evaluation(exp, state.params)
    assert evaluate.run_evaluation(exp, state.params) == first
    assert len(built) == 1  # periodic evaluations do not rebuild (and recompile) the step
    # Another task or model must not reuse a step built for this one.
    other = dataclasses.replace(exp, task=exp.task)
    assert other.eval_steps == {}
    evaluate.run_evaluation(other, state.params)
    assert len(built) == 2


def test_bfloat16_compute_trains(make_config, tmp_path):
    config = make_config(num_train_steps=8, log_every_steps=1, compute_dtype="bfloat16")
    config.optimizer.learning_rate = 1e-2
    result = train_and_evaluate(config, tmp_path)
    losses = _losses(tmp_path)
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]
    assert 0.0 <= result["eval"]["accuracy"] <= 1.0
