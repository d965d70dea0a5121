"""Converts torchvision's GoogLeNet weights to this project's Flax variables.

In Python (any mapping of torch key -> array-like; torch tensors work as they are):

    import torchvision
    from gnet_jax import apply_fn
    from gnet_jax.convert import spec_for, torchvision_to_flax
    state_dict = torchvision.models.googlenet(weights='IMAGENET1K_V1').state_dict()
    variables = torchvision_to_flax(state_dict)
    spec = spec_for(state_dict)  # torchvision variant, 1000 classes, aux heads off the keys
    logits = apply_fn(variables, nhwc_images, **spec.model_kwargs())

From the command line (needs `pip install torch`; the file is loaded with weights_only=True):

    python -m gnet_jax.convert --torchvision googlenet-1378be20.pth --out /tmp/googlenet
    # writes /tmp/googlenet/model.json (the ModelSpec) and /tmp/googlenet/checkpoints/0,
    # the layout of a training workdir; torchvision's own .pth holds the (untrained) aux
    # heads, so there aux_logits is True

    variables, spec = gnet_jax.load_model('/tmp/googlenet')
    logits = apply_fn(variables, nhwc_images, **spec.model_kwargs())

Layouts: torch convs are OIHW (ours HWIO), torch linears (out, in) (ours (in, out)), and the
aux heads' fc1 sees torch's (C, H, W)-flattened 128x4x4 map where ours flattens (H, W, C).
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from gnet_jax import paths
from gnet_jax.checkpoint import Checkpointer
from gnet_jax.model import INCEPTION_WIDTHS, init_fn
from gnet_jax.spec import ModelSpec

# torch BatchNorm field -> (collection, our name).
_BN_FIELDS = {'weight': ('params', 'scale'), 'bias': ('params', 'bias'),
              'running_mean': ('batch_stats', 'mean'), 'running_var': ('batch_stats', 'var')}
# Torch sub-module of each Inception path -> our BasicConv name.
_INCEPTION_PATHS = {'branch1': 'ch1x1', 'branch2.0': 'ch3x3_reduce', 'branch2.1': 'ch3x3',
                    'branch3.0': 'ch5x5_reduce', 'branch3.1': 'ch5x5', 'branch4.1': 'pool_proj'}
_AUX_HEADS = {'aux1': 'aux_4a', 'aux2': 'aux_4d'}
_AUX_GRID, _AUX_CHANNELS = 4, 128  # the aux heads' conv output: 128 channels on a 4x4 grid


def _key_table(aux_logits: bool) -> dict[str, tuple[str, tuple[str, ...], str]]:
  """torch key -> (collection, our module path + leaf name, kind of layout change)."""
  convs = {'conv1': ('conv1',), 'conv2': ('conv2_reduce',), 'conv3': ('conv2',)}
  for name in INCEPTION_WIDTHS:  # 'inception_3a' <- 'inception3a'
    for branch, ours in _INCEPTION_PATHS.items():
      convs[f"{name.replace('_', '')}.{branch}"] = (name, ours)
  linears = {'fc': (('classifier',), 'linear')}
  if aux_logits:
    for theirs, ours in _AUX_HEADS.items():
      convs[f'{theirs}.conv'] = (ours, 'conv')
      linears[f'{theirs}.fc1'] = ((ours, 'fc1'), 'aux_fc1')
      linears[f'{theirs}.fc2'] = ((ours, 'fc2'), 'linear')

  table = {}
  for theirs, ours in convs.items():
    table[f'{theirs}.conv.weight'] = ('params', (*ours, 'conv', 'kernel'), 'conv')
    for field, (collection, leaf) in _BN_FIELDS.items():
      table[f'{theirs}.bn.{field}'] = (collection, (*ours, 'bn', leaf), 'vector')
  for theirs, (ours, kind) in linears.items():
    table[f'{theirs}.weight'] = ('params', (*ours, 'kernel'), kind)
    table[f'{theirs}.bias'] = ('params', (*ours, 'bias'), 'vector')
  return table


def _to_numpy(value) -> np.ndarray:
  if hasattr(value, 'detach'):  # a torch tensor, maybe on a GPU or in bfloat16
    value = value.detach().cpu().float().numpy()
  return np.asarray(value, dtype=np.float32)


def _torch_shape(kind: str, ours: tuple[int, ...]) -> tuple[int, ...]:
  """The torch shape that converts to our shape `ours`."""
  if kind == 'conv':  # HWIO <- OIHW
    return (ours[3], ours[2], ours[0], ours[1])
  if kind in ('linear', 'aux_fc1'):  # (in, out) <- (out, in)
    return (ours[1], ours[0])
  return tuple(ours)


def _from_torch(kind: str, w: np.ndarray) -> np.ndarray:
  if kind == 'conv':
    return w.transpose(2, 3, 1, 0)
  if kind == 'linear':
    return w.T
  if kind == 'aux_fc1':  # input index c*16 + h*4 + w (torch) -> h*512 + w*128 + c (ours)
    out = w.shape[0]
    w = w.reshape(out, _AUX_CHANNELS, _AUX_GRID, _AUX_GRID).transpose(2, 3, 1, 0)
    return w.reshape(_AUX_GRID * _AUX_GRID * _AUX_CHANNELS, out)
  return w


def _set(tree: dict, path: tuple[str, ...], value) -> None:
  for name in path[:-1]:
    tree = tree.setdefault(name, {})
  tree[path[-1]] = value


def _get(tree: dict, path: tuple[str, ...]):
  for name in path:
    if not isinstance(tree, Mapping) or name not in tree:
      return None
    tree = tree[name]
  return tree


def spec_for(state_dict: Mapping[str, Any], transform_input: bool = True) -> ModelSpec:
  """The ModelSpec whose variables `state_dict` holds: torchvision's variant, its class
  count and aux heads read off the keys, 224x224 ImageNet preprocessing, and ImageNet's
  class names when it has 1,000 classes."""
  if 'fc.weight' not in state_dict:
    raise ValueError("missing key 'fc.weight': not a torchvision GoogLeNet state dict.")
  num_classes = int(np.shape(state_dict['fc.weight'])[0])
  aux_logits = any(k.startswith(('aux1.', 'aux2.')) for k in state_dict)
  return ModelSpec(num_classes=num_classes, variant='torchvision', aux_logits=aux_logits,
                   transform_input=transform_input, image_size=224, preprocess='inception',
                   class_names=imagenet_class_names() if num_classes == 1000 else ())


def expected_variables(spec: ModelSpec):
  """Shapes and dtypes of the spec's variables, computed without running anything."""
  images = jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32)
  return jax.eval_shape(lambda k, x: init_fn(k, x, **spec.model_kwargs()),
                        jax.random.key(0), images)


def check_same_tree(got, expected) -> None:
  """Raises ValueError naming each path whose presence, shape or dtype differ."""
  def leaves(tree):
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {jax.tree_util.keystr(p): (tuple(np.shape(v)), np.dtype(v.dtype)) for p, v in flat}
  got_leaves, want_leaves = leaves(got), leaves(expected)
  problems = [f'{p}: missing' for p in want_leaves if p not in got_leaves]
  problems += [f'{p}: not in the model' for p in got_leaves if p not in want_leaves]
  problems += [f'{p}: expected {want_leaves[p]}, got {got_leaves[p]}'
               for p in want_leaves if p in got_leaves and got_leaves[p] != want_leaves[p]]
  if not problems and jax.tree.structure(got) != jax.tree.structure(expected):
    problems = [f'tree structure {jax.tree.structure(got)} != {jax.tree.structure(expected)}']
  if problems:
    raise ValueError('converted variables do not match the model:\n  ' + '\n  '.join(problems))


def torchvision_to_flax(state_dict: Mapping[str, Any]) -> dict:
  """{'params', 'batch_stats'} of GoogLeNet(variant='torchvision', ...) from torchvision's
  googlenet state dict; aux_logits and num_classes are read off the state dict
  (see `spec_for`). `num_batches_tracked` entries are ignored.

  Raises ValueError on missing or unexpected keys and on wrong shapes.
  """
  spec = spec_for(state_dict)
  expected = expected_variables(spec)
  table = _key_table(spec.aux_logits)
  given = {k for k in state_dict if not k.endswith('num_batches_tracked')}
  missing, unexpected = sorted(table.keys() - given), sorted(given - table.keys())
  if missing or unexpected:
    raise ValueError(f'torchvision GoogLeNet state dict (num_classes={spec.num_classes}, '
                     f'aux_logits={spec.aux_logits}): missing keys {missing}, '
                     f'unexpected keys {unexpected}')

  variables = {'params': {}, 'batch_stats': {}}
  for key, (collection, path, kind) in table.items():
    value = _to_numpy(state_dict[key])
    want = _get(expected[collection], path)
    if want is not None and value.shape != _torch_shape(kind, want.shape):
      raise ValueError(f'{key}: expected shape {_torch_shape(kind, want.shape)}, '
                       f'got {value.shape}')
    _set(variables[collection], path, jnp.asarray(_from_torch(kind, value)))
  check_same_tree(variables, expected)
  return variables


def save_converted(variables: dict, spec: ModelSpec, out_dir):
  """Writes a model folder (out_dir/model.json and one checkpoint, step 0), the layout of
  a training workdir: `gnet_jax.load_model(out_dir)` reads either."""
  out_dir = paths.path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  checkpointer = Checkpointer(out_dir, async_save=False)
  try:
    checkpointer.save(0, variables, run={'converted_from': 'torchvision'}, train_window=[])
    checkpointer.wait()
  finally:
    checkpointer.close()
  spec.save(out_dir)
  return out_dir


IMAGENET_CLASSES_FILE = Path(__file__).with_name('imagenet_classes.txt')


def imagenet_class_names() -> list[str]:
  """The 1,000 ImageNet class names, in the order of torchvision's (and tfds's) labels."""
  return IMAGENET_CLASSES_FILE.read_text().splitlines()


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(
      prog='python -m gnet_jax.convert',
      description="Convert torchvision's googlenet state dict to an orbax checkpoint.")
  parser.add_argument('--torchvision', required=True, metavar='PATH.pth',
                      help='state dict saved by torch.save(model.state_dict(), PATH)')
  parser.add_argument('--out', required=True, metavar='DIR',
                      help='writes DIR/model.json and DIR/checkpoints/0 (a model folder)')
  parser.add_argument('--no-transform-input', dest='transform_input', action='store_false',
                      help="for weights trained without torchvision's transform_input "
                           '(the pretrained IMAGENET1K_V1 weights need it)')
  args = parser.parse_args(argv)
  try:
    import torch
  except ImportError:
    parser.exit(1, 'gnet_jax.convert: reading .pth files needs PyTorch: pip install torch\n')
  state_dict = torch.load(args.torchvision, map_location='cpu', weights_only=True)
  variables = torchvision_to_flax(state_dict)
  spec = spec_for(state_dict, transform_input=args.transform_input)
  out_dir = save_converted(variables, spec, args.out)
  print(f'wrote {out_dir}/model.json and {out_dir}/checkpoints/0: '
        f'{spec.replace(class_names=()).model_kwargs()}')


if __name__ == '__main__':
  main()
