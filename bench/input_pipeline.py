"""Whether the host keeps up with the accelerator: the input pipeline's images/s per core
beside a plain tf.data pipeline and a one-thread full decode of the same files, in one
run, and what that rate means in vCPUs per accelerator chip.

    python bench/input_pipeline.py --out bench/results/input_pipeline
    python bench/input_pipeline.py --files photos --out /tmp/photos   # real photographs
    python bench/input_pipeline.py --ablate --out /tmp/ablate         # what each piece costs

Files (--files): 'imagenet' are generated JPEGs like ImageNet's: 500x375 or 375x500 (most
ImageNet photos have a longer side of 500 px), quality 90, smooth shapes with sensor-like
noise, which puts them near ImageNet's bytes per pixel; 'photos' are random crops of the
real photographs that ship with scikit-learn and matplotlib, at the same sizes and
quality (less fine detail: smaller files, cheaper to decode).

Timed, in --rounds rounds that alternate the pipelines (so that a slow minute of a shared
machine falls on all of them): the one-thread full decode (tf.io.read_file and
tf.io.decode_jpeg in a one-thread tf.data map: what one core does to turn a file into
pixels, nothing else), PIL's as a cross-check, a plain tf.data pipeline of Flax's ImageNet
recipe with uint8 out (train: decode_and_crop_jpeg in an Inception window, bicubic
resize, flip; eval: the 0.875 centre crop; one parallel map, batch, prefetch), and
gnet_jax's train iterators (uint8, bfloat16, float32) and eval iterator as train.py gets
them, then its train iterator on copies at --max_sides (`python -m gnet_jax.data prepare
--max_side N`). A rate is the median of its rounds; "per core" divides it by the CPUs
this process may use, and "per CPU-s" is images per second of CPU time the process spent.
The second table turns the uint8 train iterator's rate per core into the vCPUs one chip
needs at the roofline rates of bench/tpu_report.py's results (configs/tpu.py's per-chip
batch), beside the vCPUs per chip of the Cloud machine types for those chips.
"""
from __future__ import annotations

import argparse
import contextlib
import glob
import io
import itertools
import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# pylint: disable=wrong-import-position
import benchmark  # bench/benchmark.py
from configs import default as default_config
from configs import tpu as tpu_config
# pylint: enable=wrong-import-position

# The Cloud machine type that holds each chip of bench/tpu_report.py, its vCPUs and chips:
# Cloud TPU's v5e, v5p and v6e pages and Compute Engine's accelerator-optimized machine
# types (A3 High: 8 H100; A3 Ultra: 8 H200).
MACHINES = {
    'TPU v5e': ('ct5lp-hightpu-4t', 112, 4),
    'TPU v5p': ('ct5p-hightpu-4t', 208, 4),
    'TPU v6e': ('ct6e-standard-4t', 180, 4),
    'NVIDIA H100 SXM': ('a3-highgpu-8g', 208, 8),
    'NVIDIA H200 SXM': ('a3-ultragpu-8g', 224, 8),
}
FILES = ('imagenet', 'photos')


# --- the files ----------------------------------------------------------------------

def photo_like_jpeg(rng: np.random.Generator, width: int, height: int) -> bytes:
  """A JPEG with a photograph's structure (smooth shapes plus texture), not noise.

  Pure noise compresses badly and decodes slower than real photos; smooth images the
  opposite. Low-frequency colour fields, a few shapes with edges and sensor-like noise
  land near an average ImageNet JPEG's size at 500x375, quality 90.
  """
  coarse = rng.uniform(0, 255, size=(6, 8, 3)).astype(np.uint8)
  image = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC),
                     np.float32)
  yy, xx = np.mgrid[0:height, 0:width]
  for _ in range(6):
    cy, cx = rng.uniform(0, height), rng.uniform(0, width)
    ry, rx = rng.uniform(20, height / 2), rng.uniform(20, width / 2)
    inside = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1
    image[inside] = 0.5 * image[inside] + 0.5 * rng.uniform(0, 255, size=3)
  image += rng.normal(0, 22, size=image.shape)
  return _jpeg(image.clip(0, 255).astype(np.uint8))


def _photographs() -> list[np.ndarray]:
  """The real photographs that ship inside scikit-learn and matplotlib."""
  # pylint: disable=import-outside-toplevel
  from matplotlib import cbook
  from sklearn.datasets import load_sample_image
  # pylint: enable=import-outside-toplevel
  with cbook.get_sample_data('grace_hopper.jpg') as f:
    hopper = np.asarray(Image.open(f).convert('RGB'))
  return [load_sample_image('china.jpg'), load_sample_image('flower.jpg'), hopper]


def photo_crop_jpeg(rng: np.random.Generator, width: int, height: int, photos) -> bytes:
  """A random crop (half the side or more) of a real photograph at width x height."""
  photo = photos[rng.integers(len(photos))]
  h, w = photo.shape[:2]
  ch, cw = int(h * rng.uniform(0.5, 1)), int(w * rng.uniform(0.5, 1))
  y, x = rng.integers(h - ch + 1), rng.integers(w - cw + 1)
  crop = Image.fromarray(photo[y:y + ch, x:x + cw]).resize((width, height), Image.BICUBIC)
  return _jpeg(np.asarray(crop)[:, ::-1] if rng.random() < 0.5 else np.asarray(crop))


def _jpeg(image: np.ndarray) -> bytes:
  out = io.BytesIO()
  Image.fromarray(np.ascontiguousarray(image)).save(out, 'JPEG', quality=90)
  return out.getvalue()


def write_folder(root: str, num_train: int, num_eval: int, files: str = 'imagenet',
                 num_classes: int = 10, seed: int = 0) -> float:
  """Writes root/{train,validation}/<class>/*.jpg; returns the mean file size in kB."""
  rng = np.random.default_rng(seed)
  photos = _photographs() if files == 'photos' else None
  sizes = []
  for split, count in (('train', num_train), ('validation', num_eval)):
    for i in range(count):
      cls_dir = os.path.join(root, split, f'class_{i % num_classes:02d}')
      os.makedirs(cls_dir, exist_ok=True)
      width, height = (500, 375) if rng.random() < 0.75 else (375, 500)
      data = (photo_crop_jpeg(rng, width, height, photos) if photos else
              photo_like_jpeg(rng, width, height))
      sizes.append(len(data))
      with open(os.path.join(cls_dir, f'{split}_{i:05d}.jpg'), 'wb') as f:
        f.write(data)
  return float(np.mean(sizes)) / 1e3


# --- the pipelines ------------------------------------------------------------------

def one_thread_decode(files: list[str], batch_size: int):
  """Batches of full decodes on one thread (the shapes: only the decode is timed)."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  options = tf.data.Options()
  options.threading.private_threadpool_size = 1
  options.threading.max_intra_op_parallelism = 1
  ds = tf.data.Dataset.from_tensor_slices(files).repeat().map(
      lambda p: tf.shape(tf.io.decode_jpeg(tf.io.read_file(p), channels=3)))
  return iter(ds.batch(batch_size).with_options(options))


def pil_decode(files: list[str], batch_size: int):
  for chunk in iter(lambda: itertools.islice(itertools.cycle(files), batch_size), None):
    yield np.stack([np.asarray(Image.open(f).convert('RGB')).shape for f in chunk])


def plain(files: list[str], batch_size: int, size: int, train: bool):
  """Flax's ImageNet recipe as one map, uint8 out: what a plain pipeline costs."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel

  def preprocess(path):
    raw = tf.io.read_file(path)
    shape = tf.image.extract_jpeg_shape(raw)
    if train:
      begin, crop, _ = tf.image.sample_distorted_bounding_box(
          shape, tf.constant([[[0.0, 0.0, 1.0, 1.0]]]), min_object_covered=0.1,
          aspect_ratio_range=(3 / 4, 4 / 3), area_range=(0.08, 1.0), max_attempts=10,
          use_image_if_no_bounding_boxes=True)
      window = tf.stack([begin[0], begin[1], crop[0], crop[1]])
    else:  # 224 of 256: the centre 0.875 of the shorter side
      side = tf.cast(size / (size + 32) * tf.cast(tf.minimum(shape[0], shape[1]), tf.float32),
                     tf.int32)
      window = tf.stack([(shape[0] - side + 1) // 2, (shape[1] - side + 1) // 2, side, side])
    image = tf.image.decode_and_crop_jpeg(raw, window, channels=3)
    image = tf.image.resize(image, [size, size], method='bicubic')
    if train:
      image = tf.image.random_flip_left_right(image)
    return tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)

  ds = tf.data.Dataset.from_tensor_slices(files).repeat().map(
      preprocess, num_parallel_calls=tf.data.AUTOTUNE)
  return iter(ds.batch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE))


def config_for(dataset: str, data_dir, batch_size: int, size: int, dtype: str):
  config = default_config.get_config()
  config.update(dataset=dataset, data_dir=data_dir, batch_size=batch_size, image_size=size,
                input_dtype=dtype, augment='inception')
  return config


def ours(config, source, train: bool):
  """gnet_jax's iterator as train.py gets it."""
  from gnet_jax import data  # pylint: disable=import-outside-toplevel
  create = data.create_train_iterator if train else data.create_eval_iterator
  return iter(create(config, source=source, process_index=0, process_count=1))


def link_eval_split(root: str, files: list[str], count: int) -> None:
  """root/validation: `count` links to the train files, in their class folders (so that
  one eval pass lasts a whole measurement)."""
  for i in range(count):
    path = files[i % len(files)]
    link = os.path.join(root, 'validation', os.path.basename(os.path.dirname(path)),
                        f'{i:06d}.jpg')
    os.makedirs(os.path.dirname(link), exist_ok=True)
    os.symlink(path, link)


def measure(iterator, steps: int, warmup: int) -> tuple[float, int, float]:
  """(images/s, images, images per CPU-second) over `steps` batches after `warmup`."""
  for _ in range(warmup):
    next(iterator)
  images, start, cpu = 0, time.perf_counter(), time.process_time()
  for _ in range(steps):
    batch = next(iterator)
    images += (int(batch['mask'].sum()) if 'mask' in batch else len(batch['label'])
               ) if isinstance(batch, dict) else len(batch)
  wall, cpu = time.perf_counter() - start, time.process_time() - cpu
  return images / wall, images, images / cpu


# --- what each piece of the pipeline costs (--ablate) -------------------------------

@contextlib.contextmanager
def patched(*changes):
  """Sets (object, attribute, value) for the block."""
  saved = [(obj, name, getattr(obj, name)) for obj, name, _ in changes]
  for obj, name, value in changes:
    setattr(obj, name, value)
  try:
    yield
  finally:
    for obj, name, value in saved:
      setattr(obj, name, value)


def ablations():
  """(name, context manager factory, whether the Python layer is bypassed): the train
  iterator with one piece changed."""
  # pylint: disable=import-outside-toplevel,protected-access
  import tensorflow as tf
  from gnet_jax.data import pipeline, preprocess
  # pylint: enable=import-outside-toplevel

  def options(intra_op):
    def make():
      o = tf.data.Options()
      o.deterministic = True
      o.threading.max_intra_op_parallelism = intra_op
      return o
    return make

  def stateful_window(shape_hw, seed):
    del seed
    shape = tf.concat([tf.cast(shape_hw, tf.int32), [3]], axis=0)
    begin, size, _ = tf.image.sample_distorted_bounding_box(
        shape, tf.constant([[[0.0, 0.0, 1.0, 1.0]]]), min_object_covered=0.0,
        aspect_ratio_range=(3 / 4, 4 / 3), area_range=(0.08, 1.0), max_attempts=10,
        use_image_if_no_bounding_boxes=True)
    return tf.stack([begin[0], begin[1], size[0], size[1]])

  fns = preprocess.preprocess_fns
  return [
      ('no JPEG completeness check', lambda: patched(
          (preprocess, '_ends_with_eoi', lambda raw: tf.constant(True))), False),
      ('general path only (no fast JPEG path)', lambda: patched(
          (pipeline, 'preprocess_fns', lambda **kw: fns(**kw)[-1:])), False),
      ('antialiased bilinear resize (the previous choice)', lambda: patched(
          (preprocess, 'bilinear', lambda image, size: tf.image.resize(
              image, [size, size], antialias=True))), False),
      ('stateful random crop windows (no per-example seeds)', lambda: patched(
          (preprocess, 'inception_crop_window', stateful_window)), False),
      ('max_intra_op_parallelism unset', lambda: patched(
          (pipeline, '_options', options(0))), False),
      ('4 windows in flight instead of 2', lambda: patched(
          (pipeline, 'WINDOWS_IN_FLIGHT', 4)), False),
      ('the tf.data iterator without the Python layer', contextlib.nullcontext, True),
  ]


# --- the tables ---------------------------------------------------------------------

def roofline_rows(results_dir: str) -> list[dict]:
  """The newest roofline train row per chip at configs/tpu.py's per-chip batch and
  image size, from bench/tpu_report.py's results."""
  config = tpu_config.get_config()
  per_chip = config.batch_size // 4  # configs/tpu.py's batch is for 4 chips
  rows = {}
  for path in sorted(glob.glob(os.path.join(results_dir, 'tpu_*', 'results.json'))):
    for r in json.load(open(path))['rows']:
      train = r.get('train', {})
      if (r['variant'] == 'baseline' and r['per_chip'] == per_chip and r['image_size'] ==
          config.image_size and 'roofline_images_per_s' in train):
        date = r.get('environment', {}).get('date', '')
        if r['chip'] not in rows or date >= rows[r['chip']]['date']:
          rows[r['chip']] = {'chip': r['chip'], 'target': r['topology'], 'date': date,
                             'input': 'bfloat16' if r.get('input_dtype') is None
                             else r['input_dtype'],
                             'roofline': train['roofline_images_per_s'],
                             'source': os.path.relpath(path, ROOT)}
  return [rows[c] for c in MACHINES if c in rows]


def markdown(result: dict) -> str:
  rows, ref = result['rows'], result['rows'][0]
  plain_of = {True: result['rows_by_name']['plain train pipeline, uint8'],
              False: result['rows_by_name']['plain eval pipeline, uint8']}
  lines = [f"{result['files']} files: {result['num_files']} JPEGs, mean {result['mean_kb']:.0f}"
           f" kB; batch {result['batch_size']}, {result['image_size']}x"
           f"{result['image_size']}; {result['cores']} cores; median of {result['rounds']} "
           'rounds.', '',
           '| pipeline | images/s | per core | per CPU-s | vs plain | vs one-thread decode |',
           '|---|---|---|---|---|---|']
  for r in rows:
    plain_row = plain_of.get(r.get('train'))
    vs_plain = (f"{r['images_per_s'] / plain_row['images_per_s']:.2f}x"
                if plain_row and r.get('compare_plain') else '')
    vs_decode = r['per_core'] / ref['images_per_s']
    lines.append(f"| {r['name']} | {r['images_per_s']:,.0f} | {r['per_core']:,.0f} | "
                 f"{r['per_cpu_s']:,.0f} | {vs_plain} | {vs_decode:.2f}x |")
  if result['ablations']:
    lines += ['', 'Ablations: the uint8 train iterator with one change, against it as it is '
              "in the same round (the median of the rounds' ratios).", '',
              '| change | images/s | vs as it is |', '|---|---|---|']
    lines += [f"| {a['name']} | {a['images_per_s']:,.0f} | {a['ratio']:.2f}x |"
              for a in result['ablations']]
  per_core = result['rows_by_name']['gnet_jax train, uint8']['per_core']
  if result.get('vcpus'):
    lines += ['', f'vCPUs one chip needs at its roofline rate (bench/tpu_report.py, '
              f'compiler estimates) when each vCPU feeds {per_core:,.0f} images/s (the uint8 '
              'train iterator per core above), with nothing left over for the training '
              'process itself:', '',
              '| chip | roofline images/s per chip | vCPUs needed per chip | machine type '
              '| its vCPUs per chip | roofline source |', '|---|---|---|---|---|---|']
    for v in result['vcpus']:
      lines.append(f"| {v['chip']} | {v['roofline']:,.0f} | {v['needed']:.0f} | "
                   f"{v['machine']} | {v['have']:.0f} | {v['source']} ({v['date']}, "
                   f"{v['input']} input) |")
  m = result['machine']
  lines += ['', f"Machine: {m['cpu']}, {m['cores']} cores; python {m['python']}; "
            + ', '.join(f'{k} {v}' for k, v in result['versions'].items())
            + f"; {result['date']}."]
  return '\n'.join(lines) + '\n'


# --- the run ------------------------------------------------------------------------

def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--files', default='imagenet', choices=FILES)
  parser.add_argument('--num_files', type=int, default=512)
  parser.add_argument('--batch_size', type=int, default=128)
  parser.add_argument('--image_size', type=int, default=224)
  parser.add_argument('--batches', type=int, default=24, help='timed batches per round')
  parser.add_argument('--warmup', type=int, default=4, help='untimed batches per round')
  parser.add_argument('--rounds', type=int, default=3)
  parser.add_argument('--max_sides', default='256,320,512',
                      help="resized copies to time ('' for none)")
  parser.add_argument('--ablate', action='store_true', help='also time the ablations')
  parser.add_argument('--dir', default=None, help='keep the files here (default: temp)')
  parser.add_argument('--out', required=True, help='folder of results.json and results.md')
  args = parser.parse_args(argv)
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  # pylint: disable=import-outside-toplevel
  from gnet_jax import data
  from gnet_jax.data import resized
  # pylint: enable=import-outside-toplevel
  cores = len(os.sched_getaffinity(0))
  b, size = args.batch_size, args.image_size

  with tempfile.TemporaryDirectory() as tmp:
    root = args.dir or os.path.join(tmp, 'files')
    start = time.perf_counter()
    mean_kb = write_folder(root, args.num_files, 0, args.files)
    files = sorted(glob.glob(os.path.join(root, 'train', '*', '*.jpg')))
    link_eval_split(root, files, (args.warmup + args.batches) * args.batch_size)
    print(f'wrote {len(files)} {args.files} JPEGs (mean {mean_kb:.0f} kB) under {root} in '
          f'{time.perf_counter() - start:.0f} s', flush=True)
    folder = f'folder:{root}'
    source = data.build_source(config_for(folder, None, b, size, 'uint8'))
    # name -> (iterator factory, train?, compared with the plain pipeline?)
    pipelines = {
        'one-thread full decode (tf.io.decode_jpeg)':
            (lambda: one_thread_decode(files, b), None, False),
        'one-thread full decode (PIL)': (lambda: pil_decode(files, b), None, False),
        'plain train pipeline, uint8': (lambda: plain(files, b, size, True), True, False),
        'plain eval pipeline, uint8': (lambda: plain(files, b, size, False), False, False),
    }
    for dtype in ('uint8', 'bfloat16', 'float32'):
      config = config_for(folder, None, b, size, dtype)
      pipelines[f'gnet_jax train, {dtype}'] = (
          lambda c=config: ours(c, source, True), True, dtype == 'uint8')
    config = config_for(folder, None, b, size, 'uint8')
    pipelines['gnet_jax eval, uint8'] = (lambda: ours(config, source, False), False, True)
    prepare = {}
    for n in [int(n) for n in args.max_sides.split(',') if n]:
      start = time.perf_counter()
      name, _ = resized.write_resized_copy(source, max_side=n, data_dir=tmp,
                                            splits=['train'])
      prepare[n] = time.perf_counter() - start
      copy = config_for(name, tmp, b, size, 'uint8')
      copy.eval_split = 'train'  # only train is copied
      copy_source = data.build_source(copy)
      pipelines[f'gnet_jax train, uint8, copy at max side {n}'] = (
          lambda c=copy, s=copy_source: ours(c, s, True), True, True)
    extra = ablations() if args.ablate else []
    base = pipelines['gnet_jax train, uint8'][0]

    samples = {name: [] for name in pipelines}
    ratios = {name: [] for name, _, _ in extra}
    for round_ in range(args.rounds):
      for name, (make, _, _) in pipelines.items():
        samples[name].append(measure(make(), args.batches, args.warmup))
        print(f'round {round_ + 1}: {name}: {samples[name][-1][0]:,.0f} images/s', flush=True)
      for name, context, bypass in extra:
        with context():
          iterator = base()
          changed = measure(iterator._it if bypass else iterator,  # pylint: disable=protected-access
                            args.batches, args.warmup)[0]
        ratios[name].append((changed, changed / measure(base(), args.batches, args.warmup)[0]))
        print(f'round {round_ + 1}: {name}: {ratios[name][-1][1]:.2f}x', flush=True)

  rows = []
  for name, (_, train, compare) in pipelines.items():
    rate = statistics.median(s[0] for s in samples[name])
    rows.append({'name': name, 'train': train, 'compare_plain': compare,
                 'images_per_s': rate, 'per_core': rate / (1 if train is None else cores),
                 'per_cpu_s': statistics.median(s[2] for s in samples[name]),
                 'rounds': [s[0] for s in samples[name]]})
  by_name = {r['name']: r for r in rows}
  per_core = by_name['gnet_jax train, uint8']['per_core']
  vcpus = [{**r, 'needed': r['roofline'] / per_core, 'machine': MACHINES[r['chip']][0],
            'have': MACHINES[r['chip']][1] / MACHINES[r['chip']][2]}
           for r in roofline_rows(os.path.join(ROOT, 'bench', 'results'))]
  machine = benchmark.describe_machine()
  result = {
      'files': args.files, 'num_files': len(files), 'mean_kb': mean_kb, 'batch_size': b,
      'image_size': size, 'cores': cores, 'rounds': args.rounds, 'rows': rows,
      'rows_by_name': by_name, 'prepare_s': prepare, 'vcpus': vcpus,
      'ablations': [{'name': n, 'images_per_s': statistics.median(x[0] for x in v),
                     'ratio': statistics.median(x[1] for x in v)} for n, v in ratios.items()],
      'machine': machine, 'date': time.strftime('%Y-%m-%d'),
      'versions': benchmark.package_versions(('tensorflow', 'tensorflow-datasets', 'pillow')),
  }
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, 'results.json'), 'w') as f:
    json.dump({k: v for k, v in result.items() if k != 'rows_by_name'}, f, indent=1)
  text = markdown(result)
  with open(os.path.join(args.out, 'results.md'), 'w') as f:
    f.write(text)
  print(text)


if __name__ == '__main__':
  main()
