"""Training augmentation of image batches ``[B, C, H, W]``, in torch on the training device.

The closed list of ``training.augmentation`` (``app.jobs.schemas.Augmentation``), applied in this
order: random resized crop (Szegedy et al. 2015, as torchvision's ``RandomResizedCrop``),
horizontal flip, colour jitter (as torchvision's ``ColorJitter``, without hue), then mixup (Zhang
et al. 2018) or cutmix (Yun et al. 2019) across the batch. torchvision itself is not used: its
wheels need another torch build than ours.

Every random draw of a step comes from a CPU ``torch.Generator`` seeded from the job's
``training.seed`` and the global step, so a job (and a run resumed from a checkpoint) draws the
same augmentation again. Per-sample parameters are drawn on the CPU (a few numbers per image) and
copied to the device once per step; the pixels never leave the device.

Throughput: with augmentation the teacher's outputs cannot be computed once, since every step
shows it other images, so the recipe runs the teacher on every augmented batch (online): each
training step then costs a teacher forward pass besides the student's (``worker.recipe``).
"""

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from app.jobs.schemas import Augmentation, ColorJitter

# torchvision's RandomResizedCrop tries this many boxes before falling back to a central crop.
CROP_ATTEMPTS = 10
# ITU-R 601-2 luma, as torchvision's rgb_to_grayscale.
LUMA_RGB = (0.2989, 0.587, 0.114)


@dataclass(frozen=True)
class Mix:
    """How mixup or cutmix mixed a batch: sample ``i`` is ``lam`` of itself (its own label)
    and ``1 - lam`` of sample ``perm[i]``, whose label is ``labels[i]``."""

    labels: torch.Tensor
    lam: float
    perm: torch.Tensor


def step_generator(seed: int, step: int) -> torch.Generator:
    """A CPU generator for one training step, from the job's seed and the global step."""
    state = np.random.SeedSequence([seed, step]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


def horizontal_flip(x: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """``x [B, C, H, W]`` with the samples where ``flip [B]`` (bool) is set mirrored left-right."""
    return torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)


def crop_boxes(
    n: int,
    height: int,
    width: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    generator: torch.Generator,
) -> torch.Tensor:
    """``n`` boxes ``[n, 4]`` (top, left, height, width; whole pixels) drawn as torchvision's
    ``RandomResizedCrop.get_params``: an area of ``scale`` of the image's and an aspect ratio
    (width / height) log-uniform in ``ratio``; the first of ``CROP_ATTEMPTS`` draws that fits in
    the image, else a central crop with the ratio clamped into ``ratio``."""
    area = height * width
    target = area * torch.empty(n, CROP_ATTEMPTS).uniform_(*scale, generator=generator)
    log_ratio = torch.empty(n, CROP_ATTEMPTS).uniform_(
        math.log(ratio[0]), math.log(ratio[1]), generator=generator
    )
    aspect = log_ratio.exp()
    w = torch.round(torch.sqrt(target * aspect)).long()
    h = torch.round(torch.sqrt(target / aspect)).long()
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.long().argmax(dim=1)  # the first draw that fits (0 when none does)
    w, h = w.gather(1, first[:, None])[:, 0], h.gather(1, first[:, None])[:, 0]
    found = fits.any(dim=1)
    # Where it fits, any position in the image, uniformly.
    u = torch.rand(n, 2, generator=generator)
    top = torch.floor(u[:, 0] * (height - h + 1).clamp_min(1)).long()
    left = torch.floor(u[:, 1] * (width - w + 1).clamp_min(1)).long()
    # The fallback: the largest central box whose ratio is within `ratio`.
    in_ratio = width / height
    if in_ratio < ratio[0]:
        fw, fh = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        fw, fh = round(height * ratio[1]), height
    else:
        fw, fh = width, height
    fallback = torch.tensor([(height - fh) // 2, (width - fw) // 2, fh, fw])
    boxes = torch.stack([top, left, h, w], dim=1)
    return torch.where(found[:, None], boxes, fallback)


def resized_crop(x: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Each image of ``x [B, C, H, W]`` cut to its box (top, left, height, width) and resized
    back to ``H x W`` by bilinear sampling (``grid_sample``, pixel centres as
    ``interpolate(align_corners=False)``); the whole image as its box gives it back."""
    b, _, height, width = x.shape
    boxes = boxes.to(device=x.device, dtype=torch.float32)
    top, left, h, w = boxes.unbind(dim=1)
    # The box in normalised coordinates (-1 and 1 are the image's outer edges): its centre and
    # half-sizes map the output grid onto it.
    theta = torch.zeros(b, 2, 3, device=x.device, dtype=torch.float32)
    theta[:, 0, 0] = w / width
    theta[:, 0, 2] = (2 * left + w) / width - 1
    theta[:, 1, 1] = h / height
    theta[:, 1, 2] = (2 * top + h) / height - 1
    grid = F.affine_grid(theta, [b, 1, height, width], align_corners=False)
    return F.grid_sample(
        x.float(), grid, mode="bilinear", padding_mode="border", align_corners=False
    ).to(x.dtype)


def grayscale(x: torch.Tensor, channel_order: str = "RGB") -> torch.Tensor:
    """Luma ``[B, 1, H, W]`` of RGB (or BGR) images; a grey image is its own."""
    if x.shape[1] == 1:
        return x
    weights = LUMA_RGB if channel_order != "BGR" else LUMA_RGB[::-1]
    luma = torch.tensor(weights, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x * luma).sum(dim=1, keepdim=True)


def jitter_factors(n: int, strength: float, generator: torch.Generator) -> torch.Tensor:
    """``n`` factors uniform in ``[1 - strength, 1 + strength]`` (strength in [0, 1])."""
    return torch.empty(n).uniform_(1.0 - strength, 1.0 + strength, generator=generator)


def color_jitter(
    x: torch.Tensor,
    factors: dict[str, torch.Tensor],
    order: list[str],
    value_range: tuple[float, float],
    channel_order: str = "RGB",
) -> torch.Tensor:
    """Brightness, contrast and saturation of ``x [B, C, H, W]`` by per-image ``factors [B]``,
    in ``order``, as torchvision's ``adjust_*`` functions on images in ``value_range`` (each
    result clamped to it):

    - brightness: ``low + f (x - low)`` (torchvision's ``f x`` when ``low`` is 0);
    - contrast: ``f x + (1 - f) mean(gray(x))``, the mean over the whole image;
    - saturation: ``f x + (1 - f) gray(x)``, per pixel (RGB).
    """
    low, high = value_range
    for name in order:
        f = factors[name].to(device=x.device, dtype=x.dtype).view(-1, 1, 1, 1)
        if name == "brightness":
            x = low + f * (x - low)
        elif name == "contrast":
            mean = grayscale(x, channel_order).mean(dim=(1, 2, 3), keepdim=True)
            x = f * x + (1 - f) * mean
        else:
            x = f * x + (1 - f) * grayscale(x, channel_order)
        x = x.clamp(low, high)
    return x


def mixup(x: torch.Tensor, lam: float, perm: torch.Tensor) -> torch.Tensor:
    """``lam * x + (1 - lam) * x[perm]`` (Zhang et al. 2018)."""
    return lam * x + (1.0 - lam) * x[perm]


def cutmix_box(
    height: int, width: int, lam: float, generator: torch.Generator
) -> tuple[int, int, int, int]:
    """The box (top, left, bottom, right; exclusive ends) of Yun et al.'s ``rand_bbox``: sides
    ``sqrt(1 - lam)`` of the image's, centred on a uniform pixel, clipped to the image."""
    cut = math.sqrt(1.0 - lam)
    cut_h, cut_w = int(height * cut), int(width * cut)
    cy = int(torch.randint(height, (1,), generator=generator))
    cx = int(torch.randint(width, (1,), generator=generator))
    top, bottom = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, height)
    left, right = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, width)
    return top, left, bottom, right


def cutmix(
    x: torch.Tensor, box: tuple[int, int, int, int], perm: torch.Tensor
) -> tuple[torch.Tensor, float]:
    """``x`` with ``box`` of ``x[perm]`` pasted in (Yun et al. 2019), and the lambda of what is
    left of each image, ``1 - box area / image area`` (the label weight, adjusted for the box
    being clipped at the image's edges)."""
    top, left, bottom, right = box
    mixed = x.clone()
    mixed[:, :, top:bottom, left:right] = x[perm][:, :, top:bottom, left:right]
    height, width = x.shape[-2:]
    return mixed, 1.0 - (bottom - top) * (right - left) / (height * width)


def beta(alpha: float, generator: torch.Generator) -> float:
    """One draw of ``Beta(alpha, alpha)``: torch's Beta takes no generator, so numpy's draws it,
    seeded from ``generator``."""
    seed = int(torch.randint(2**62, (1,), generator=generator))
    return float(np.random.default_rng(seed).beta(alpha, alpha))


class Augmenter:
    """``training.augmentation`` for one job: ``augmenter(x, labels, step)`` gives the step's
    augmented images ``[B, C, H, W]`` (on ``x``'s device) and how they were mixed, if they were.

    ``value_range`` is the dataset's (its training inputs' smallest and largest values): colour
    jitter clamps to it. ``channel_order`` is the dataset's (``RGB``, ``BGR``, ``L``).
    """

    def __init__(
        self,
        config: Augmentation,
        seed: int,
        value_range: tuple[float, float],
        channel_order: str = "RGB",
    ) -> None:
        self.config, self.seed = config, seed
        self.value_range, self.channel_order = value_range, channel_order

    def __call__(
        self, x: torch.Tensor, labels: torch.Tensor, step: int
    ) -> tuple[torch.Tensor, Mix | None]:
        config, generator = self.config, step_generator(self.seed, step)
        n, _, height, width = x.shape
        if config.random_resized_crop is not None:
            crop = config.random_resized_crop
            boxes = crop_boxes(n, height, width, crop.scale, crop.ratio, generator)
            x = resized_crop(x, boxes)
        if config.horizontal_flip:
            x = horizontal_flip(x, (torch.rand(n, generator=generator) < 0.5).to(x.device))
        if config.color_jitter is not None:
            x = self.jitter(x, config.color_jitter, generator)
        mix = None
        if config.mixup is not None or config.cutmix is not None:
            perm = torch.randperm(n, generator=generator).to(x.device)
            if config.mixup is not None:
                lam = beta(config.mixup.alpha, generator)
                x = mixup(x, lam, perm)
            else:
                assert config.cutmix is not None
                drawn = beta(config.cutmix.alpha, generator)
                x, lam = cutmix(x, cutmix_box(height, width, drawn, generator), perm)
            mix = Mix(labels=labels[perm], lam=lam, perm=perm)
        return x, mix

    def jitter(
        self, x: torch.Tensor, config: ColorJitter, generator: torch.Generator
    ) -> torch.Tensor:
        """Colour jitter with factors per image, the adjustments in a random order per batch
        (torchvision draws one per image)."""
        strengths = {
            "brightness": config.brightness,
            "contrast": config.contrast,
            "saturation": config.saturation,
        }
        names = list(strengths)
        order = [names[i] for i in torch.randperm(len(names), generator=generator).tolist()]
        order = [name for name in order if strengths[name] > 0]
        factors = {name: jitter_factors(len(x), strengths[name], generator) for name in order}
        return color_jitter(x, factors, order, self.value_range, self.channel_order)
