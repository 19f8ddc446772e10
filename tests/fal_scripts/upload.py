"""fal-client's uploads into kontextd's storage: upload_file in both repositories (fal_v3, the default, and
fal) and upload_image, then an edit whose image_url is the uploaded file.

fal-client has no variable for its storage hosts: they are module globals, set here as the README says.
Usage: upload.py <path of a PNG file>."""

import os
import sys

import fal_client
import fal_client.client
from _common import MAX_EDIT, emit
from PIL import Image

# The two lines the README shows: the storage API is at the server's root, like the queue.
fal_client.client.REST_URL = f"https://{os.environ['FAL_QUEUE_RUN_HOST']}"
fal_client.client.CDN_URL = f"https://{os.environ['FAL_QUEUE_RUN_HOST']}"

path = sys.argv[1]
v3_url = fal_client.upload_file(path)  # token, then POST /files/upload
fal_url = fal_client.upload_file(path, repository="fal")  # /storage/upload/initiate, then PUT
image_url = fal_client.upload_image(Image.new("RGB", (90, 160), (20, 200, 90)), format="png")
edited = fal_client.subscribe(
    MAX_EDIT, {"prompt": "add a rainbow", "image_url": fal_url, "output_format": "png"}, interval=0.05
)
try:
    fal_client.upload(b"<html><script>alert(1)</script></html>", "text/html", file_name="page.html")
    refused = None
except fal_client.FalClientHTTPError as error:
    refused = {"status_code": error.status_code, "detail": error.response.json()["detail"]}
emit({"v3_url": v3_url, "fal_url": fal_url, "image_url": image_url, "edited": edited, "refused": refused})
