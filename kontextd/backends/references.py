"""Several reference images as the one image diffusers' FluxKontextPipeline conditions on.

FluxKontextPipeline takes one reference image: its latents are appended to the output's in the sequence,
at position index 1. Several references are given to it the way Kontext [dev]'s own ComfyUI workflow
combines them ("Image Stitch"): side by side on one canvas, each scaled to the same height, the canvas then
scaled to the output's area. So the model sees every reference at once, four references cost what one does
(the same number of image tokens), and the pipeline runs unchanged. One reference is resized to the output
size itself, as before: a single-image edit on a multi endpoint equals the same edit on the edit endpoint.
"""

import math

from PIL import Image

Box = tuple[int, int, int, int]  # left, top, right, bottom on the canvas


def canvas_layout(
    sizes: list[tuple[int, int]], area: int, multiple: int
) -> tuple[tuple[int, int], list[Box]]:
    """The canvas size and each reference's box on it: side by side in order, all one height, about
    `area` pixels in all, both sides multiples of `multiple` (the pipeline's latent packing needs it).

    Pure arithmetic, so it is tested without images: widths are rounded so they add up to the canvas
    exactly, with no gap and no overlap.
    """
    if not sizes:
        raise ValueError("no reference images")
    # Each reference's width when all are one unit tall, and so the canvas's width-to-height ratio.
    relative = [width / height for width, height in sizes]
    ratio = sum(relative)
    height = max(multiple, round(math.sqrt(area / ratio) / multiple) * multiple)
    width = max(multiple, round(height * ratio / multiple) * multiple)
    boxes, left, edge = [], 0, 0.0
    for share in relative:
        edge += share / ratio * width
        right = min(width, max(left + 1, round(edge)))  # at least a pixel each, however thin
        boxes.append((left, 0, right, height))
        left = right
    boxes[-1] = (boxes[-1][0], 0, width, height)
    return (width, height), boxes


def reference_image(images: list[Image.Image], size: tuple[int, int], multiple: int) -> Image.Image:
    """What the pipeline is given for `images` when the output is `size`: the one image resized to it, or
    all of them side by side on a canvas of about the output's area."""
    if len(images) == 1:
        return images[0].resize(size, Image.Resampling.LANCZOS)
    canvas_size, boxes = canvas_layout([image.size for image in images], size[0] * size[1], multiple)
    canvas = Image.new("RGB", canvas_size)
    for image, (left, top, right, bottom) in zip(images, boxes, strict=True):
        canvas.paste(image.resize((right - left, bottom - top), Image.Resampling.LANCZOS), (left, top))
    return canvas
