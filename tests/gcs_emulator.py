"""A fake Google Cloud Storage on 127.0.0.1 for the gs:// tests (`gcp-storage-emulator`).

    python tests/gcs_emulator.py     # prints {"endpoint": "http://127.0.0.1:PORT"}, serves
                                     # bucket "bucket" until its stdin closes; a line
                                     # 'down' on its stdin drops every connection until
                                     # a line 'up' (a lost network, its data kept)

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
import socketserver
import sys
import threading
from http import HTTPStatus

# Set by a line 'down' on the emulator's stdin, cleared by 'up': while set, every
# connection is closed without an answer, as when the network to the store is lost.
DOWN = threading.Event()

# Read when google-auth, gcsfs and etils are imported: set before they are.
OFFLINE_ENV = {
    'NO_GCE_CHECK': 'true',  # google-auth: never probe the GCE metadata server...
    'GCE_METADATA_HOST': '127.0.0.1:9', 'GCE_METADATA_IP': '127.0.0.1:9',
    'GCE_METADATA_ROOT': '127.0.0.1:9',  # ...and if something still does: a closed port
    'GOOGLE_AUTH_TOKEN_FOR_TESTING': 'fake',  # tensorstore: a fixed token, no OAuth
    'FSSPEC_GCS_TOKEN': 'anon', 'FSSPEC_GS_TOKEN': 'anon',  # gcsfs: anonymous
    'GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT': 'false',  # gcsfs: no gRPC bucket probe (it hangs)
    'EPATH_USE_TF': 'false',  # etils.epath: gs:// through gcsfs, not tf.io.gfile
    'GOOGLE_CLOUD_PROJECT': 'test',
}


def client_env(endpoint: str) -> dict:
  """The variables that send gcsfs and tensorstore (Orbax's arrays) to `endpoint`."""
  return {**OFFLINE_ENV, 'STORAGE_EMULATOR_HOST': endpoint,
          'TENSORSTORE_GCS_HTTP_URL': endpoint}


def _move(request, response, storage, *args, **kwargs):  # pylint: disable=unused-argument
  """objects.move (POST .../o/SRC/moveTo/o/DST), which gcsfs's rename uses and the
  emulator lacks: without it gcsfs retries for a long while before copying and deleting."""
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


def _patch(server) -> None:
  """Fixes what real GCS clients (libcurl in tensorstore) send that the emulator mishandles."""
  from gcp_storage_emulator.handlers import objects  # pylint: disable=import-outside-toplevel
  route = (r'^/storage/v1/b/(?P<bucket_name>[-.\w]+)/o/(?P<object_id>.*[^/]+)'
           r'/moveTo/o/(?P<dest_object_id>.*[^/]+)$', {'POST': _move})
  server.HANDLERS = (route, *server.HANDLERS)
  read_raw = server._read_raw_data  # pylint: disable=protected-access

  def read_raw_data(handler):
    # RFC 9112: Transfer-Encoding: chunked wins over Content-Length. libcurl sends both on
    # resumable uploads, and the emulator stored the chunk framing as the object's bytes.
    if (handler.headers.get('Transfer-Encoding') or '').lower() == 'chunked':
      del handler.headers['Content-Length']
    return read_raw(handler)
  server._read_raw_data = read_raw_data  # pylint: disable=protected-access
  media_upload = objects._media_upload  # pylint: disable=protected-access

  def empty_media_upload(request, response, storage):
    if request.data is None:  # a zero-byte upload crashed the handler
      request._data = b''  # pylint: disable=protected-access
    return media_upload(request, response, storage)
  objects._media_upload = empty_media_upload  # pylint: disable=protected-access
  download = objects.download

  def download_with_generation(request, response, storage, *args, **kwargs):
    # Real GCS names the object's generation in every download's headers; tensorstore
    # (Orbax's OCDBT manifest read-back) refuses a download without it.
    try:
      obj = storage.get_file_obj(request.params['bucket_name'], request.params['object_id'])
      response['x-goog-generation'] = str(obj['generation'])
      response['x-goog-metageneration'] = str(obj.get('metageneration', 1))
    except Exception:  # pylint: disable=broad-except  # the download answers 404 itself
      pass
    return download(request, response, storage, *args, **kwargs)
  objects.download = download_with_generation
  server.HANDLERS = tuple(
      (route, {m: download_with_generation if h is download else h for m, h in methods.items()})
      if isinstance(methods, dict) else (route, methods) for route, methods in server.HANDLERS)
  parse_request = server.RequestHandler.parse_request

  def answer_expect_continue(handler):
    if DOWN.is_set():  # a lost connection: closed without an answer
      handler.close_connection = True
      return False
    # An HTTP/1.0 server does not answer "Expect: 100-continue": libcurl waited 1 s.
    ok = parse_request(handler)
    if ok and (handler.headers.get('Expect') or '').lower() == '100-continue':
      handler.send_response_only(100)
      handler.end_headers()
    return ok
  server.RequestHandler.parse_request = answer_expect_continue
  # Clients close connections early at times: no traceback for each (this process only).
  socketserver.BaseServer.handle_error = lambda *args: None


def main() -> None:
  from gcp_storage_emulator import server  # pylint: disable=import-outside-toplevel
  logging.getLogger('gcp_storage_emulator').setLevel(logging.CRITICAL)  # "not found" chatter
  _patch(server)
  emulator = server.create_server('127.0.0.1', 0, in_memory=True, default_bucket='bucket')
  emulator.start()
  port = emulator._api._httpd.server_address[1]  # pylint: disable=protected-access
  print(json.dumps({'endpoint': f'http://127.0.0.1:{port}'}), flush=True)
  for line in sys.stdin:  # until the test closes our stdin (or dies)
    {'down': DOWN.set, 'up': DOWN.clear}[line.strip()]()
  emulator.stop()


if __name__ == '__main__':
  main()
