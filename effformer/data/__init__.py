"""Input pipelines and datasets.

``get_dataset_info(data_config)`` and ``create_input_pipeline(data_config, ...)``
serve the trainer; ``default_data_config(name)`` lists every field;
``mix_batch`` is Mixup/CutMix on device. Datasets: ``list_datasets()``.
"""

from effformer.data.config import default_data_config, validate_data_config
from effformer.data.mixup import mix_batch
from effformer.data.pipeline import InputPipeline, create_input_pipeline
from effformer.data.registry import (
    DatasetInfo,
    DatasetNotPreparedError,
    get_dataset_info,
    list_datasets,
)

__all__ = [
    "DatasetInfo",
    "DatasetNotPreparedError",
    "InputPipeline",
    "create_input_pipeline",
    "default_data_config",
    "get_dataset_info",
    "list_datasets",
    "mix_batch",
    "validate_data_config",
]
