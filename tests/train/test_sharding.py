"""The device mesh the config selects."""

import ml_collections
import pytest

from effformer.train.sharding import create_mesh


def _mesh_config(**changes):
    config = ml_collections.ConfigDict(dict(num_devices=0, fsdp=1, data=-1))
    config.update(changes)
    return config


def test_mesh_takes_every_device_or_the_first_n():
    assert create_mesh(_mesh_config()).size == 8
    assert dict(create_mesh(_mesh_config(num_devices=4, fsdp=2)).shape) == {"data": 2, "fsdp": 2}


@pytest.mark.parametrize("count", [-1, 2.0, True])
def test_bad_num_devices_is_refused(count):
    # -1 used to slice devices[:-1] and build a 7-device mesh without a word.
    config = ml_collections.ConfigDict(dict(num_devices=count, fsdp=1, data=-1))
    with pytest.raises(ValueError, match="config.mesh.num_devices must be an int >= 0"):
        create_mesh(config)
