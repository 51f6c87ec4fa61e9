"""Image files as a model's input, decoded once, the one way: `dvt predict` (single-process and on Ray Data)
reads image files and folders of them with these, by the weights' data config."""
from __future__ import annotations

import os

import numpy as np

from dvt_shared.data_config import DataConfig

from .options import CommandError


def decode_image(data: bytes, model_data: DataConfig, name: str) -> np.ndarray:
    """Encoded image bytes (PNG, JPEG, ... anything PIL reads) as the model's float32 (C, H, W) input, as its
    data config says (see `dvt_shared.transforms.eval_array`); `name` names the image in the error. The one
    decoder of `dvt predict`, single-process (`load_images`) and on Ray Data (`dvt_cli.ray_predict`)."""
    from dvt_shared.data_sources import ImageRef, decode

    try:
        return decode(ImageRef(name, data=data), model_data)[0]
    except ValueError as exc:
        raise CommandError(str(exc)) from None


def folder_images(folder: str) -> list[str]:
    """The images under `folder` (recursive, by extension, hidden files and folders left out), sorted."""
    from dvt_shared.data_sources import IMAGE_EXTENSIONS
    from dvt_shared.data_sources import folder_images as found

    images = found(folder)
    if not images:
        raise CommandError(f"{folder} is a folder without images ({', '.join(IMAGE_EXTENSIONS)}, in any subfolder)")
    return images


def image_paths(inputs: list[str]) -> list[str]:
    """The image files `inputs` name, in order: a file as it is, a folder as its `folder_images`."""
    return [path for item in inputs for path in (folder_images(item) if os.path.isdir(item) else [item])]


def load_images(paths: list[str], model_data: DataConfig) -> np.ndarray:
    """Image files as the model's float32 input batch (each as `decode_image` decodes it)."""
    batch = []
    for path in paths:
        if path.lower().endswith(".parquet"):
            raise CommandError(f"{path}: parquet inputs are read by Ray Data: pass --ray (and --out FILE.parquet)")
        if not os.path.isfile(path):
            raise CommandError(f"{path} is not an image file")
        try:
            with open(path, "rb") as handle:
                data = handle.read()
        except OSError as exc:
            raise CommandError(f"{path}: cannot read it as an image ({exc})") from exc
        batch.append(decode_image(data, model_data, path))
    return np.stack(batch)


# What `POST /v1/predict` takes: the formats every HTTP client and browser sends.
POSTED_FORMATS = ("PNG", "JPEG")


def decode_posted_image(body: bytes, model_data: DataConfig) -> np.ndarray:
    """A PNG or JPEG request body as the model's (1, C, H, W) float32 input, decoded as `decode_image` decodes;
    any other body is the protocol's 415."""
    import io

    from PIL import Image, UnidentifiedImageError

    from dvt_serve.protocol import ProtocolError

    try:
        with Image.open(io.BytesIO(body)) as image:
            kind = image.format
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise ProtocolError(f"the body is not a PNG or JPEG image ({exc})", status=415) from None
    if kind not in POSTED_FORMATS:
        raise ProtocolError(f"the body is a {kind} image; send PNG or JPEG", status=415)
    try:
        return decode_image(body, model_data, "the body")[None]
    except CommandError as exc:
        raise ProtocolError(str(exc), status=415) from None
