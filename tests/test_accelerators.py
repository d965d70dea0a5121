"""gnet_jax.accelerators: what JAX computes on, said plainly, with the machine's devices,
environment and installed versions injected."""
import types

import pytest

from gnet_jax import accelerators

CPU = [types.SimpleNamespace(platform='cpu', device_kind='cpu')]
T4 = [types.SimpleNamespace(platform='gpu', device_kind='Tesla T4')]


@pytest.fixture
def versions(monkeypatch):
  """Installed versions as the test sets them (None: not installed)."""
  installed = {'jax': '0.7.2', 'jaxlib': '0.7.2'}
  monkeypatch.setattr(accelerators, '_version', installed.get)
  monkeypatch.setattr(accelerators.importlib.metadata, 'requires', lambda name: [
      'jaxlib<=0.7.2,>=0.7.2', 'libtpu==0.0.23; extra == "tpu"'])
  return installed


def test_says_what_jax_computes_on(tmp_path, versions):
  assert accelerators.report(CPU, dev=str(tmp_path), environ={}) == (
      'JAX computes on 1 CPU device(s): cpu.')
  (tmp_path / 'nvidia0').touch()
  assert accelerators.report(T4, dev=str(tmp_path), environ={}) == (
      'JAX computes on 1 GPU device(s): Tesla T4.')


@pytest.mark.parametrize('device_file,environ,kind', [
    ('nvidia0', {}, 'GPU'), ('accel0', {}, 'TPU'), ('vfio/0', {}, 'TPU'),
    (None, {'COLAB_TPU_ADDR': '10.0.0.2:8470'}, 'TPU'),
    (None, {'TPU_ACCELERATOR_TYPE': 'v5litepod-1'}, 'TPU')])
def test_an_accelerator_jax_does_not_use_is_said_plainly(tmp_path, versions, device_file,
                                                          environ, kind):
  if device_file:
    (tmp_path / device_file).parent.mkdir(exist_ok=True)
    (tmp_path / device_file).touch()
  text = accelerators.report(CPU, dev=str(tmp_path), environ=environ)
  assert f'This machine has a {kind} that JAX does not use.' in text
  assert f'jax[{kind.lower() if kind == "TPU" else "cuda12"}]' in text


def test_versions_that_do_not_belong_together(tmp_path, versions):
  versions.update({'jax-cuda12-plugin': '0.7.2', 'jax-cuda12-pjrt': '0.7.2', 'libtpu': '0.0.23'})
  assert accelerators.version_mismatches() == []
  versions.update({'jax': '0.12.0.1', 'jaxlib': '0.12.0.1', 'libtpu': '0.0.23'})
  assert accelerators.version_mismatches() == [
      "jax-cuda12-plugin 0.7.2 is not at jaxlib's version 0.12.0.1",
      "jax-cuda12-pjrt 0.7.2 is not at jaxlib's version 0.12.0.1"]
  versions.update({'libtpu': '0.0.50.1'})
  assert 'libtpu 0.0.50.1 is not the 0.0.23 that jax 0.12.0.1 asks for' in (
      accelerators.version_mismatches())
  assert 'Version mismatch: jax-cuda12-plugin 0.7.2' in accelerators.report(
      CPU, dev=str(tmp_path), environ={})


def test_a_pin_with_a_wildcard(monkeypatch, versions):
  """jax 0.12 asks for libtpu==0.0.50.*: any 0.0.50 release belongs with it, 0.0.5 does not."""
  monkeypatch.setattr(accelerators.importlib.metadata, 'requires', lambda name: [
      'libtpu==0.0.50.*; extra == "tpu"'])
  for libtpu in ('0.0.50', '0.0.50.1'):
    versions['libtpu'] = libtpu
    assert accelerators.version_mismatches() == []
  versions['libtpu'] = '0.0.5'
  assert accelerators.version_mismatches() == [
      'libtpu 0.0.5 is not the 0.0.50.* that jax 0.7.2 asks for']


def test_this_installation():
  """The suite's own environment: a coherent jax stack, and a report JAX can give."""
  assert accelerators.version_mismatches() == []
  assert accelerators.report().startswith('JAX computes on')
