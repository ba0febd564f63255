"""`python tests/_gcs_emulator.py start ...`: gcp-storage-emulator's command line, its media downloads
given the x-goog-generation and x-goog-metageneration headers that GCS sends with every object read.
TensorStore takes an object's generation from them (OCDBT's manifest is rewritten conditionally on
it) and fails with "Malformed StorageGeneration" without them."""

import sys
from http import HTTPStatus

from gcp_storage_emulator.handlers import objects

_download = objects.download


def download(request, response, storage, *args, **kwargs):
    _download(request, response, storage, *args, **kwargs)
    if response.status in (HTTPStatus.OK, HTTPStatus.PARTIAL_CONTENT):
        obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
        response["x-goog-generation"] = str(obj["generation"])
        response["x-goog-metageneration"] = str(obj["metageneration"])


objects.download = download  # before the server module builds its routes from it

from gcp_storage_emulator.__main__ import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
