"""Live previews: the latents in the middle of the denoising loop, seen as an image without the VAE.

FLUX's 16 latent channels map roughly linearly to RGB: ComfyUI's latent-to-RGB previewer uses the
16x3 factors below (comfy/latent_formats.py, class Flux), fitted on decoded images. A preview is one
small matrix product over the latent grid (1/8 of the output's sides: 128x128 for a megapixel), no extra
model and no VAE decode: well under a millisecond on a GPU, a few on a CPU. Mid-loop latents are still
noisy, so early previews are mostly noise; they sharpen as the steps go.
"""

import torch
from diffusers import FluxKontextPipeline
from PIL import Image

PREVIEW_EVERY = 4  # steps between previews: a few per request, each a small JPEG the status stream sends

# Rows: latent channels; columns: R, G, B.
FLUX_LATENT_RGB = (
    (-0.0346, 0.0244, 0.0681),
    (0.0034, 0.0210, 0.0687),
    (0.0275, -0.0668, -0.0433),
    (-0.0174, 0.0160, 0.0617),
    (0.0859, 0.0721, 0.0329),
    (0.0004, 0.0383, 0.0115),
    (0.0405, 0.0861, 0.0915),
    (-0.0236, -0.0185, -0.0259),
    (-0.0245, 0.0250, 0.1180),
    (0.1008, 0.0755, -0.0421),
    (-0.0515, 0.0201, 0.0011),
    (0.0428, -0.0012, -0.0036),
    (0.0817, 0.0765, 0.0749),
    (-0.1264, -0.0522, -0.1103),
    (-0.0280, -0.0881, -0.0499),
    (-0.1262, -0.0982, -0.0778),
)
FLUX_LATENT_RGB_BIAS = (-0.0329, -0.0718, -0.0851)


def wants_preview(step: int, total: int) -> bool:
    """After every PREVIEW_EVERY-th step (1-based), but not the last: the image itself comes then."""
    return step % PREVIEW_EVERY == 0 and step < total


def latent_preview(latents: torch.Tensor, height: int, width: int, vae_scale_factor: int) -> Image.Image:
    """The first image's packed latents (batch, tokens, 64) as an RGB image at the latent grid's size."""
    grid = FluxKontextPipeline._unpack_latents(latents[:1], height, width, vae_scale_factor)[0]  # (16, h, w)
    factors = torch.tensor(FLUX_LATENT_RGB, dtype=torch.float32, device=grid.device)
    bias = torch.tensor(FLUX_LATENT_RGB_BIAS, dtype=torch.float32, device=grid.device)
    rgb = torch.einsum("chw,cr->hwr", grid.float(), factors) + bias
    pixels = ((rgb + 1) * 127.5).clamp(0, 255).to(torch.uint8).cpu().numpy()
    return Image.fromarray(pixels, "RGB")
