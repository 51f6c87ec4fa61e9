"""The one evaluation pipeline (`dvt_shared.transforms`) equals torchvision's release transform."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from dvt_shared.datasets import normalise_fashion_mnist
from dvt_shared.transforms import IMAGENET_MEAN, IMAGENET_STD, eval_array


def _torchvision_release_eval(image, img_size: int) -> np.ndarray:
    from torchvision import transforms

    pipeline = transforms.Compose([
        transforms.Resize(int(img_size / (224 / 256)), interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(img_size),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])
    return pipeline(image).numpy()


@pytest.mark.parametrize("size,img_size", [((300, 241), 224), ((97, 150), 64), ((123, 123), 32), ((64, 301), 56)])
def test_rgb_evaluation_equals_torchvision(size, img_size):
    pixels = np.random.default_rng(sum(size)).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    image = Image.fromarray(pixels, mode="RGB")
    ours = eval_array(image, 3, img_size)
    assert ours.shape == (3, img_size, img_size) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, _torchvision_release_eval(image, img_size), atol=1e-6)


def test_grey_evaluation_is_fashion_mnist_normalisation():
    pixels = np.random.default_rng(0).integers(0, 256, (28, 28), dtype=np.uint8)
    ours = eval_array(Image.fromarray(pixels, mode="L"), 1, 28)
    np.testing.assert_array_equal(ours, normalise_fashion_mnist(pixels[None])[0])


def test_training_evaluation_transform_is_the_shared_one():
    """An image folder is evaluated during training with the release's evaluation transform."""
    from dvt_shared import get_model_config
    from dvt_torch.data import folder_transforms

    pixels = np.random.default_rng(1).integers(0, 256, (70, 90, 3), dtype=np.uint8)
    image = Image.fromarray(pixels, mode="RGB")
    _, evaluation = folder_transforms(get_model_config("dvt_deit_small", img_size=48))
    np.testing.assert_array_equal(evaluation(image).numpy(), eval_array(image, 3, 48))
