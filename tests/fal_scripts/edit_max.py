"""An edit through fal-ai/flux-pro/kontext/max with the input image as a data: URI."""

import fal_client
from _common import MAX_EDIT, emit, png_data_uri

arguments = {"prompt": "add a rainbow", "image_url": png_data_uri(320, 180), "output_format": "png"}
result = fal_client.subscribe(MAX_EDIT, arguments, interval=0.05)
missing_format = {key: value for key, value in arguments.items() if key != "output_format"}
try:
    fal_client.submit(MAX_EDIT, missing_format)
    rejected = None
except fal_client.FalClientHTTPError as error:
    rejected = {"status_code": error.status_code, "detail": error.response.json()["detail"]}
emit({"result": result, "without_output_format": rejected})
