"""effformer.train.evaluate: restoring a run on a machine other than the one it trained on."""

import json

import pytest

from effformer.train import train_and_evaluate
from effformer.train.evaluate import restore, run_evaluation


@pytest.mark.parametrize("num_devices", [0, 16])
def test_a_run_whose_batches_do_not_split_over_this_machine_restores(
    make_config, tmp_path, num_devices
):
    # Trained on 2 devices with a batch of 6; saved as if on every device of a 1-GPU
    # machine (0) or on 16 accelerators: here, 8 devices do not split a batch of 6.
    config = make_config(num_train_steps=1, global_batch_size=6, mesh__num_devices=2)
    result = train_and_evaluate(config, tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    saved["mesh"]["num_devices"] = num_devices
    (tmp_path / "config.json").write_text(json.dumps(saved))
    run = restore(tmp_path)
    assert run.experiment.mesh.size == 6  # The most devices here that split a batch of 6.
    metrics = run_evaluation(run.experiment, run.params, model_state=run.model_state)
    assert metrics == pytest.approx(result["eval"], rel=1e-6)
