"""Datasets built locally from bundled or generated data: no network needed.

Each is a TFDS ``GeneratorBasedBuilder`` written as ``array_record`` into the
user's data_dir on first use, then read like any prepared TFDS dataset.
"""
