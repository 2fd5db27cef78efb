"""A data_dir holding the embedded datasets, built once per test session."""

import pytest

from effformer.data import default_data_config, get_dataset_info


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tfds"))
    for name in ("digits", "mnist1d"):
        config = default_data_config(name)
        config.data_dir = path
        get_dataset_info(config)  # Builds it.
    return path


@pytest.fixture
def make_config(data_dir):
    def make(name, **fields):
        config = default_data_config(name)
        config.data_dir = data_dir
        config.update(fields)
        return config

    return make
