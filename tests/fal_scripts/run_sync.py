"""fal_client.run: the sync run route answers with the output itself."""

import fal_client
from _common import TEXT_TO_IMAGE, emit

result = fal_client.run(TEXT_TO_IMAGE, {"prompt": "a paper boat", "seed": 1234, "output_format": "png"})
emit({"result": result})
