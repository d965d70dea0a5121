"""notebooks/quickstart.ipynb runs top to bottom (briefly), so it cannot rot."""
import os

import nbclient
import nbformat
import pytest

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_quickstart_notebook_runs(digits_data_dir, monkeypatch):
  monkeypatch.setenv('GNET_NOTEBOOK_STEPS', '4')
  monkeypatch.setenv('TFDS_DATA_DIR', digits_data_dir)
  notebook = nbformat.read(os.path.join(ROOT, 'notebooks', 'quickstart.ipynb'), as_version=4)
  nbclient.NotebookClient(notebook, timeout=600, kernel_name='python3',
                          resources={'metadata': {'path': os.path.join(ROOT, 'notebooks')}}).execute()
  outputs = ''.join(o.get('text', '') for cell in notebook.cells if cell.cell_type == 'code'
                    for o in cell.outputs)
  assert 'JAX computes on' in outputs  # the accelerator, said first
  assert '163,328' in outputs  # the layer table
  assert '393,728' in outputs  # what inception_3a's 1x1 reductions save
  assert 'eval top1' in outputs  # trained and evaluated
  images = [o for cell in notebook.cells if cell.cell_type == 'code' for o in cell.outputs
            if 'image/png' in o.get('data', {})]
  assert len(images) == 3  # the network, the curves and the classified digits
