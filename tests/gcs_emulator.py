"""A fake Google Cloud Storage on 127.0.0.1 for the gs:// tests (`gcp-storage-emulator`).

    python tests/gcs_emulator.py     # prints {"endpoint": "http://127.0.0.1:PORT"}, serves
                                     # bucket "bucket" until its stdin closes

It runs in a process of its own, so that the processes under test (train.py and the test
process itself) reach it over HTTP like a real bucket. `OFFLINE_ENV` and `client_env`
point every library in the chain at it and keep them off Google's metadata and token
servers: etils.epath (with EPATH_USE_TF=false, through gcsfs), Orbax's tensorstore and
gcsfs itself. TensorFlow's own GCS filesystem has its endpoints compiled in and cannot be
pointed here; nothing in a run's workdir goes through it (gnet_jax/metrics.py writes
TensorBoard events through epath).
"""
import json
import logging
import sys
from http import HTTPStatus

# Read when google-auth, gcsfs and etils are imported: set before they are.
OFFLINE_ENV = {
    'NO_GCE_CHECK': 'true',  # google-auth: never probe the GCE metadata server...
    'GCE_METADATA_HOST': '127.0.0.1:9', 'GCE_METADATA_IP': '127.0.0.1:9',
    'GCE_METADATA_ROOT': '127.0.0.1:9',  # ...and if something still does: a closed port
    'GOOGLE_AUTH_TOKEN_FOR_TESTING': 'fake',  # tensorstore: a fixed token, no OAuth
    'FSSPEC_GCS_TOKEN': 'anon', 'FSSPEC_GS_TOKEN': 'anon',  # gcsfs: anonymous
    'GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT': 'false',  # gcsfs: no gRPC bucket probe (60 s hangs)
    'EPATH_USE_TF': 'false',  # etils.epath: gs:// through gcsfs, not tf.io.gfile
    'GOOGLE_CLOUD_PROJECT': 'test',
}


def client_env(endpoint: str) -> dict:
  """The variables that send gcsfs and tensorstore (Orbax's arrays) to `endpoint`."""
  return {**OFFLINE_ENV, 'STORAGE_EMULATOR_HOST': endpoint,
          'TENSORSTORE_GCS_HTTP_URL': endpoint}


def _move(request, response, storage, *args, **kwargs):  # pylint: disable=unused-argument
  """objects.move (POST .../o/SRC/moveTo/o/DST), which gcsfs's rename uses and the
  emulator lacks: without it gcsfs retries for ~30 s before copying and deleting."""
  from gcp_storage_emulator.exceptions import NotFound  # pylint: disable=import-outside-toplevel
  from gcp_storage_emulator.handlers import objects  # pylint: disable=import-outside-toplevel
  p = request.params
  try:
    moved = objects._copy(request.base_url, storage, p['bucket_name'], p['object_id'],  # pylint: disable=protected-access
                          p['bucket_name'], p['dest_object_id'])
    objects._delete(storage, p['bucket_name'], p['object_id'])  # pylint: disable=protected-access
    response.json(moved)
  except NotFound:
    response.status = HTTPStatus.NOT_FOUND


def main() -> None:
  from gcp_storage_emulator import server  # pylint: disable=import-outside-toplevel
  logging.getLogger('gcp_storage_emulator').setLevel(logging.CRITICAL)  # "not found" chatter
  route = (r'^/storage/v1/b/(?P<bucket_name>[-.\w]+)/o/(?P<object_id>.*[^/]+)'
           r'/moveTo/o/(?P<dest_object_id>.*[^/]+)$', {'POST': _move})
  server.HANDLERS = (route, *server.HANDLERS)
  emulator = server.create_server('127.0.0.1', 0, in_memory=True, default_bucket='bucket')
  emulator.start()
  port = emulator._api._httpd.server_address[1]  # pylint: disable=protected-access
  print(json.dumps({'endpoint': f'http://127.0.0.1:{port}'}), flush=True)
  sys.stdin.read()  # until the test closes our stdin (or dies)
  emulator.stop()


if __name__ == '__main__':
  main()
