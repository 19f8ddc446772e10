"""Live previews (kontextd.backends.previews): which steps, and the latent-to-RGB projection."""

import torch
from diffusers import FluxKontextPipeline

from kontextd.backends.previews import FLUX_LATENT_RGB, PREVIEW_EVERY, latent_preview, wants_preview


def test_a_preview_every_few_steps_but_never_after_the_last() -> None:
    assert [step for step in range(1, 13) if wants_preview(step, 12)] == [4, 8]  # not 12: the image comes
    assert [step for step in range(1, 29) if wants_preview(step, 28)] == [4, 8, 12, 16, 20, 24]
    assert not any(wants_preview(step, PREVIEW_EVERY) for step in range(1, PREVIEW_EVERY + 1))


def test_the_projection_maps_each_channel_to_its_colour_at_its_place() -> None:
    height = width = 64  # pixels: an 8x8 latent grid, packed 2x2 into 16 tokens of 64
    grid = torch.zeros(1, 16, 8, 8)
    grid[0, 4, 2, 5] = 5.0  # channel 4 is mostly red and green in FLUX's factors
    packed = FluxKontextPipeline._pack_latents(grid, 1, 16, 8, 8)
    image = latent_preview(packed, height, width, 8)
    assert image.size == (8, 8)
    bias = round((-0.0329 + 1) * 127.5), round((-0.0718 + 1) * 127.5), round((-0.0851 + 1) * 127.5)
    assert all(abs(a - b) <= 1 for a, b in zip(image.getpixel((0, 0)), bias, strict=True))  # zero latents
    r, g, b = (
        round((5.0 * factor + offset + 1) * 127.5)
        for factor, offset in zip(FLUX_LATENT_RGB[4], (-0.0329, -0.0718, -0.0851), strict=True)
    )
    assert all(abs(a - e) <= 1 for a, e in zip(image.getpixel((5, 2)), (r, g, b), strict=True))  # x=5, y=2
