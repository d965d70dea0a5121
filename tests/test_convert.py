"""torchvision googlenet -> gnet_jax: the converted variables compute torchvision's function.

torch and torchvision are test extras; their model is built with random weights (nothing is
downloaded) and random BatchNorm statistics and affine parameters, so that the logits
depend on every layer.
"""
import copy

import jax
import numpy as np
import pytest

from gnet_jax import ModelSpec, load_model
from gnet_jax.convert import check_same_tree, expected_variables, main
from gnet_jax.convert import torchvision_to_flax
from gnet_jax.model import GoogLeNetOutputs, apply_fn

# The `torch` extra; environments without it (CI's newest-stack job) deselect these tests
# with -m 'not torch', and collecting the file must not need torch either.
torch = pytest.importorskip('torch', reason="the `torch` extra: pip install -e '.[torch]'")
torchvision = pytest.importorskip('torchvision', reason="the `torch` extra")
nn = torch.nn

pytestmark = pytest.mark.torch

NUM_CLASSES = 100
BATCH = 2
RTOL = 1e-4

_apply = jax.jit(apply_fn, static_argnames=(
    'train', 'variant', 'transform_input', 'aux_logits', 'num_classes', 'use_bn',
    'dropout_rate', 'aux_dropout_rate'))


def rel_err(ours, theirs) -> float:
  ours, theirs = np.asarray(ours), np.asarray(theirs)
  assert ours.shape == theirs.shape
  return float(np.abs(ours - theirs).max() / np.abs(theirs).max())


def randomise_batchnorm(model: nn.Module, seed: int) -> None:
  """Running stats from a random batch (so every layer's input is of unit scale), then
  random affine parameters and perturbed statistics."""
  g = torch.Generator().manual_seed(seed)
  bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
  for bn in bns:
    bn.reset_running_stats()
    bn.momentum = None  # a plain average over the calibration batch
  model.train()
  with torch.no_grad():
    model(torch.randn(4, 3, 224, 224, generator=g))
    for bn in bns:
      n = bn.num_features
      bn.momentum = 0.1
      bn.weight.copy_(torch.rand(n, generator=g) + 0.5)
      bn.bias.copy_(0.2 * torch.randn(n, generator=g))
      bn.running_mean.add_(0.2 * bn.running_var.sqrt() * torch.randn(n, generator=g))
      bn.running_var.mul_(torch.exp(0.5 * torch.randn(n, generator=g)))
  model.eval()


def make_torch_model(aux_logits=True, num_classes=NUM_CLASSES, seed=0) -> nn.Module:
  torch.manual_seed(seed)
  model = torchvision.models.googlenet(weights=None, aux_logits=aux_logits, init_weights=True,
                                       num_classes=num_classes, transform_input=False)
  randomise_batchnorm(model, seed)
  return model


@pytest.fixture(scope='module')
def torch_model():
  return make_torch_model()


@pytest.fixture(scope='module')
def variables(torch_model):
  return torchvision_to_flax(torch_model.state_dict())


def images(height, width, seed=0):
  """The same batch as torch NCHW and as our NHWC."""
  x = np.random.RandomState(seed).randn(BATCH, 3, height, width).astype(np.float32)
  return torch.from_numpy(x), x.transpose(0, 2, 3, 1)


def torch_eval(model, x, transform_input):
  model = copy.copy(model)  # shallow: shares the weights, own transform_input and mode
  model.transform_input = transform_input
  model.eval()
  with torch.no_grad():
    return model(x).numpy()


# Ceil-mode 3x3/2 pools without padding start their windows one pixel later than padded
# ones, at every size; on odd inputs they also give one row fewer. Feature-map sides after
# conv1 and the four stride-2 pools (padded pools in brackets where they differ):
#   224: 112 56 28 14 7    160: 80 40 20 10 5
#   299: 150 75 37 (38) 18 (19) 9    193: 97 48 (49) 24 (25) 12 (13) 6
#   250: 125 62 (63) 31 (32) 15 (16) 8, the 2x2/2 pool4 keeping a partial last window.
@pytest.mark.slow
@pytest.mark.parametrize('height,width,transform_input', [
    (224, 224, True), (160, 160, False), (299, 299, True), (193, 250, False)])
def test_eval_logits_match_torchvision(torch_model, variables, height, width, transform_input):
  x_torch, x_ours = images(height, width)
  theirs = torch_eval(torch_model, x_torch, transform_input)
  ours = _apply(variables, x_ours, variant='torchvision', transform_input=transform_input,
                aux_logits=True, num_classes=NUM_CLASSES)
  err = rel_err(ours, theirs)
  print(f'eval {height}x{width} transform_input={transform_input}: rel err {err:.2e}')
  assert err <= RTOL
  # The two images get different logits: the parity is not that of the biases alone.
  assert np.abs(theirs[0] - theirs[1]).max() > 100 * RTOL * np.abs(theirs).max()


def biased_running_var(old_model, new_model, counts):
  """new_model's state dict, its running_var redone with the biased batch variance.

  torch updates running_var with the unbiased batch variance (n / (n - 1) times the
  biased one that it normalises with); Flax's BatchNorm uses the biased one for both.
  """
  old, new = old_model.state_dict(), new_model.state_dict()
  out = dict(new)
  for name, n in counts.items():
    key = f'{name}.running_var'
    unbiased = (new[key] - 0.9 * old[key]) / 0.1
    out[key] = 0.9 * old[key] + 0.1 * unbiased * (n - 1) / n
  return out


# The aux heads (run only in training) pool 14x14 and 12x15 adaptively to 4x4 here.
@pytest.mark.slow
@pytest.mark.parametrize('height,width,transform_input', [(224, 224, True), (193, 250, False)])
def test_train_outputs_and_batch_stats_match_torchvision(torch_model, variables, height, width,
                                                         transform_input):
  model = copy.deepcopy(torch_model)
  model.transform_input = transform_input
  model.dropout.p = model.aux1.dropout.p = model.aux2.dropout.p = 0.0
  counts = {}  # BatchNorm module name -> values per channel in this batch
  for name, module in model.named_modules():
    if isinstance(module, nn.BatchNorm2d):
      module.register_forward_hook(
          lambda m, inputs, _, name=name: counts.__setitem__(
              name, inputs[0].numel() // inputs[0].shape[1]))
  model.train()
  x_torch, x_ours = images(height, width, seed=1)
  with torch.no_grad():
    logits, aux2, aux1 = model(x_torch)

  outputs, batch_stats = _apply(
      variables, x_ours, train=True, dropout_rate=0.0, aux_dropout_rate=0.0,
      variant='torchvision', transform_input=transform_input, aux_logits=True,
      num_classes=NUM_CLASSES)
  assert isinstance(outputs, GoogLeNetOutputs)
  errs = {'logits': rel_err(outputs.logits, logits), 'aux_4a': rel_err(outputs.aux_4a, aux1),
          'aux_4d': rel_err(outputs.aux_4d, aux2)}
  print(f'train {height}x{width}: rel errs {errs}')
  assert max(errs.values()) <= RTOL, errs

  # running_mean: as torch updates it; running_var: with the biased variance (see above).
  assert len(counts) == 57 + 2 * 1  # 57 BasicConvs in the trunk, 1 in each aux head
  want = torchvision_to_flax(biased_running_var(torch_model, model, counts))['batch_stats']
  flat_want = jax.tree_util.tree_flatten_with_path(want)[0]
  flat_ours = jax.tree.leaves(batch_stats)
  assert jax.tree.structure(batch_stats) == jax.tree.structure(want)
  stat_errs = {jax.tree_util.keystr(p): rel_err(o, w) for (p, w), o in zip(flat_want, flat_ours)}
  worst = max(stat_errs, key=stat_errs.get)
  print(f'train {height}x{width}: worst batch_stats rel err {stat_errs[worst]:.2e} at {worst}')
  assert stat_errs[worst] <= RTOL, (worst, stat_errs[worst])


@pytest.mark.slow
def test_cli_round_trip(torch_model, variables, tmp_path):
  path = tmp_path / 'googlenet.pth'
  torch.save(torch_model.state_dict(), path)
  main(['--torchvision', str(path), '--out', str(tmp_path / 'converted')])

  loaded, spec = load_model(tmp_path / 'converted')
  assert spec == ModelSpec(variant='torchvision', num_classes=NUM_CLASSES, aux_logits=True,
                           transform_input=True)
  assert ModelSpec.load(tmp_path / 'converted') == spec
  model_kwargs = spec.model_kwargs()
  check_same_tree(loaded, variables)
  for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(variables)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

  x_torch, x_ours = images(224, 224)
  theirs = torch_eval(torch_model, x_torch, transform_input=True)
  assert rel_err(_apply(loaded, x_ours, **model_kwargs), theirs) <= RTOL


@pytest.mark.slow
def test_numpy_state_dict_and_no_aux_heads():
  model = make_torch_model(aux_logits=False, num_classes=10, seed=1)
  state_dict = {k: v.numpy() for k, v in model.state_dict().items()}
  converted = torchvision_to_flax(state_dict)
  assert 'aux_4a' not in converted['params'] and 'aux_4d' not in converted['batch_stats']
  assert converted['params']['classifier']['kernel'].shape == (1024, 10)
  check_same_tree(converted, expected_variables(ModelSpec(variant='torchvision', num_classes=10,
                                                          aux_logits=False)))
  x_torch, x_ours = images(224, 224)
  ours = _apply(converted, x_ours, variant='torchvision', aux_logits=False, num_classes=10)
  assert rel_err(ours, torch_eval(model, x_torch, transform_input=False)) <= RTOL


def test_aux_fc1_is_reordered_from_chw_to_hwc(torch_model, variables):
  theirs = torch_model.aux1.fc1.weight.detach().numpy()  # (1024, 128 * 4 * 4), C,H,W order
  ours = np.asarray(variables['params']['aux_4a']['fc1']['kernel'])  # (4 * 4 * 128, 1024)
  c, h, w = 5, 2, 3
  np.testing.assert_array_equal(ours[h * 512 + w * 128 + c], theirs[:, c * 16 + h * 4 + w])


def test_missing_key_is_named(torch_model):
  state_dict = dict(torch_model.state_dict())
  del state_dict['inception4b.branch3.1.bn.running_var']
  with pytest.raises(ValueError, match=r"missing keys \['inception4b\.branch3\.1\.bn\.running_var'\]"):
    torchvision_to_flax(state_dict)


def test_unexpected_key_is_named(torch_model):
  state_dict = dict(torch_model.state_dict())
  state_dict['inception3a.branch3.2.conv.weight'] = torch.zeros(1)
  with pytest.raises(ValueError, match=r"unexpected keys \['inception3a\.branch3\.2\.conv\.weight'\]"):
    torchvision_to_flax(state_dict)


def test_wrong_shape_is_named(torch_model):
  state_dict = dict(torch_model.state_dict())
  state_dict['inception3a.branch3.1.conv.weight'] = torch.zeros(32, 16, 5, 5)  # the paper's 5x5
  with pytest.raises(ValueError, match=r'inception3a\.branch3\.1\.conv\.weight: expected shape '
                                       r'\(32, 16, 3, 3\), got \(32, 16, 5, 5\)'):
    torchvision_to_flax(state_dict)
  state_dict = dict(torch_model.state_dict())
  state_dict['aux2.fc2.weight'] = torch.zeros(7, 1024)  # fc says NUM_CLASSES classes
  with pytest.raises(ValueError, match=rf'aux2\.fc2\.weight: expected shape '
                                       rf'\({NUM_CLASSES}, 1024\), got \(7, 1024\)'):
    torchvision_to_flax(state_dict)


def test_tree_check_names_paths(variables):
  bad = jax.tree.map(lambda x: x, variables)
  del bad['batch_stats']['conv1']['bn']['var']
  bad['params']['conv2']['conv']['kernel'] = np.zeros((1, 1, 1, 1), np.float32)
  bad['params']['conv2']['extra'] = np.zeros(3, np.float32)
  with pytest.raises(ValueError) as info:
    check_same_tree(bad, variables)
  message = str(info.value)
  assert "['batch_stats']['conv1']['bn']['var']: missing" in message
  assert "['params']['conv2']['extra']: not in the model" in message
  assert "['params']['conv2']['conv']['kernel']: expected ((3, 3, 64, 192)" in message
