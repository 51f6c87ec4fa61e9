"""The one evaluation pipeline (`dvt_shared.transforms`, read from a model's data config) equals torchvision's
release transform and timm's evaluation transform of that config, and training evaluates with it."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from dvt_shared.data_config import IMAGENET_MEAN, IMAGENET_STD, DataConfig, default_data_config
from dvt_shared.datasets import normalise_fashion_mnist
from dvt_shared.models import get_model_config
from dvt_shared.transforms import eval_array


def _torchvision_release_eval(image, img_size: int) -> np.ndarray:
    from torchvision import transforms

    pipeline = transforms.Compose([
        transforms.Resize(int(img_size / (224 / 256)), interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(img_size),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])
    return pipeline(image).numpy()


def _rgb_config(img_size: int) -> DataConfig:
    return default_data_config(get_model_config("dvt_deit_small", img_size=img_size))


@pytest.mark.parametrize("size,img_size", [((300, 241), 224), ((97, 150), 64), ((123, 123), 32), ((64, 301), 56)])
def test_rgb_evaluation_equals_torchvision(size, img_size):
    pixels = np.random.default_rng(sum(size)).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    image = Image.fromarray(pixels, mode="RGB")
    ours = eval_array(image, _rgb_config(img_size))
    assert ours.shape == (3, img_size, img_size) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, _torchvision_release_eval(image, img_size), atol=1e-6)


def test_grey_evaluation_is_fashion_mnist_normalisation():
    pixels = np.random.default_rng(0).integers(0, 256, (28, 28), dtype=np.uint8)
    ours = eval_array(Image.fromarray(pixels, mode="L"), default_data_config(get_model_config("dvt_t2t_vit_fmnist")))
    np.testing.assert_array_equal(ours, normalise_fashion_mnist(pixels[None])[0])


@pytest.mark.parametrize("data", [
    DataConfig((1, 28, 28), (0.3,), (0.4,), "bilinear", 1.0),
    DataConfig((3, 32, 32), (0.5, 0.4, 0.3), (0.2, 0.25, 0.3), "bicubic", 0.9),
    DataConfig((3, 20, 20), (0.1, 0.2, 0.3), (0.5, 0.5, 0.5), "nearest", 0.75),
], ids=["grey", "rgb-bicubic", "rgb-nearest"])
def test_any_data_config_evaluates_as_timm_does(data):
    """Another size, crop, interpolation and statistics: the shared transform equals timm's evaluation transform
    of the same config (what `timm.data.create_transform(**resolve_data_config(model=m))` builds)."""
    from timm.data import create_transform

    mode = "L" if data.channels == 1 else "RGB"
    shape = (45, 37) if data.channels == 1 else (45, 37, 3)
    image = Image.fromarray(np.random.default_rng(3).integers(0, 256, shape, dtype=np.uint8), mode=mode)
    timm_eval = create_transform(input_size=data.input_size, mean=data.mean, std=data.std,
                                 interpolation=data.interpolation, crop_pct=data.crop_pct, crop_mode=data.crop_mode)
    np.testing.assert_allclose(eval_array(image, data), timm_eval(image).numpy(), rtol=0, atol=1e-6)


def test_training_evaluation_transform_is_the_shared_one():
    """An image folder is evaluated during training with the shared evaluation transform of its data config."""
    from dvt_torch.data import folder_transforms

    pixels = np.random.default_rng(1).integers(0, 256, (70, 90, 3), dtype=np.uint8)
    image = Image.fromarray(pixels, mode="RGB")
    _, evaluation = folder_transforms(_rgb_config(48))
    np.testing.assert_array_equal(evaluation(image).numpy(), eval_array(image, _rgb_config(48)))
