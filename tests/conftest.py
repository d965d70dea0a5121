"""Shared test fixtures."""
import os

import pytest

from gnet_jax import cpu_tuning

# The settings train.py uses; also makes the suite faster. Subprocesses inherit them.
cpu_tuning.use_fast_cpu_kernels()

# Tests build the offline digits dataset once per session under this directory.
_DATA_DIR_ENV = 'GNET_TEST_DATA_DIR'


@pytest.fixture(scope='session')
def digits_data_dir(tmp_path_factory):
  """A tfds data directory with the built-in digits dataset prepared in it."""
  from gnet_jax import input_pipeline  # pylint: disable=import-outside-toplevel
  from configs import quickstart  # pylint: disable=import-outside-toplevel
  data_dir = os.environ.get(_DATA_DIR_ENV) or str(tmp_path_factory.mktemp('tfds'))
  config = quickstart.get_config()
  config.data_dir = data_dir
  input_pipeline.get_dataset_info(config)  # writes the tfds files on first use
  return data_dir
