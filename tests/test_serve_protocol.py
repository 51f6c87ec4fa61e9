"""The Open Inference Protocol codec of `dvt serve` (dvt_serve.protocol), without a server: requests as
`tritonclient` builds them (JSON and binary data) parse to the model's input, responses parse back in
`tritonclient`, and every bad request is a ProtocolError naming its problem."""
import json
import re

import numpy as np
import pytest

from dvt_cli.images import decode_posted_image
from dvt_serve.protocol import (
    DEFAULT_OUTPUTS,
    HEADER_LENGTH,
    ProtocolError,
    encode_infer_response,
    model_metadata,
    parse_infer_request,
)
from dvt_shared import get_model_config
from dvt_shared.adaptive import Prediction
from dvt_shared.data_config import default_data_config
from dvt_shared.transforms import eval_array, normalise_pixels

http = pytest.importorskip("tritonclient.http")

CONFIG = get_model_config("dvt_t2t_vit_fmnist")
DATA = default_data_config(CONFIG).replace(class_names=tuple(f"class {k}" for k in range(CONFIG.num_classes)))


def triton_body(array, datatype, binary=True, outputs=None, name="images", request_id=""):
    """(body, header length or None) as tritonclient sends them."""
    tensor = http.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array, binary_data=binary)
    requested = None if outputs is None else [http.InferRequestedOutput(n, binary_data=b) for n, b in outputs]
    body, header = http.InferenceServerClient.generate_request_body([tensor], requested, request_id=request_id)
    return body, None if header is None else str(header)


def pixels(n, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(n, 28, 28), dtype=np.uint8)


@pytest.mark.parametrize("binary", [True, False])
def test_uint8_pixels_are_normalised_as_the_eval_transform(binary):
    from PIL import Image

    raw = pixels(3)
    parsed = parse_infer_request(*triton_body(raw, "UINT8", binary), CONFIG, DATA)
    want = np.stack([eval_array(Image.fromarray(p), DATA) for p in raw])
    np.testing.assert_array_equal(parsed.images, want)
    # naming no outputs, tritonclient asks for all of them as binary data (binary_data_output)
    assert parsed.outputs == tuple((name, True) for name in DEFAULT_OUTPUTS)
    # (n, C, H, W) pixels are the same images
    np.testing.assert_array_equal(parse_infer_request(*triton_body(raw[:, None], "UINT8"), CONFIG, DATA).images, want)


@pytest.mark.parametrize("binary", [True, False])
def test_fp32_input_passes_through(binary):
    array = np.random.default_rng(1).standard_normal((2, 1, 28, 28)).astype(np.float32)
    parsed = parse_infer_request(*triton_body(array, "FP32", binary, request_id="r7"), CONFIG, DATA)
    np.testing.assert_array_equal(parsed.images, array)
    assert parsed.id == "r7"


def test_nested_json_data_is_accepted():
    raw = pixels(1)
    body = json.dumps({"inputs": [{"name": "images", "datatype": "UINT8", "shape": [1, 28, 28],
                                   "data": raw.tolist()}]}).encode()
    want = normalise_pixels(raw[:, None], DATA)
    np.testing.assert_array_equal(parse_infer_request(body, None, CONFIG, DATA).images, want)


@pytest.mark.parametrize("binary", [True, False])
def test_responses_parse_in_tritonclient(binary):
    rng = np.random.default_rng(2)
    prediction = Prediction(rng.standard_normal((4, 10)).astype(np.float32), np.array([0, 2, 1, -1]),
                            rng.random(4).astype(np.float32), np.array([5, 9, 7, 9]))
    outputs = [(name, binary) for name in ("logits", "exit", "class_index", "label", "confidence", "macs")]
    parsed = parse_infer_request(*triton_body(pixels(4), "UINT8", outputs=outputs, request_id="abc"), CONFIG, DATA)
    body, headers = encode_infer_response(CONFIG.name, parsed, prediction, DATA)
    header = headers.get(HEADER_LENGTH)
    result = http.InferenceServerClient.parse_response_body(body, header_length=None if header is None else
                                                            int(header))
    assert (header is not None) == binary
    np.testing.assert_array_equal(result.as_numpy("logits"), prediction.logits)
    np.testing.assert_array_equal(result.as_numpy("class_index"), prediction.classes)
    # BYTES in both encodings: the class names the data config records, decoded by tritonclient
    assert [v.decode() if isinstance(v, bytes) else v for v in result.as_numpy("label")] == [
        DATA.class_names[c] for c in prediction.classes]
    np.testing.assert_array_equal(result.as_numpy("exit"), prediction.exit_index)
    np.testing.assert_array_equal(result.as_numpy("confidence"), prediction.confidence)
    np.testing.assert_array_equal(result.as_numpy("macs"), prediction.macs)
    assert result.get_response()["id"] == "abc" and [o["name"] for o in result.get_response()["outputs"]] == [
        name for name, _ in outputs]


def test_metadata_describes_the_model():
    meta = model_metadata(CONFIG, "dvt_torch", DATA)
    assert meta["name"] == CONFIG.name and meta["inputs"][0]["shape"] == [-1, 1, 28, 28]
    assert meta["inputs"][0]["parameters"]["datatypes"] == ["UINT8", "FP32"]
    assert meta["parameters"]["data_config"]["class_names"] == list(DATA.class_names)
    assert {o["name"]: o["datatype"] for o in meta["outputs"]}["label"] == "BYTES"
    assert {o["name"]: o["shape"] for o in meta["outputs"]}["logits"] == [-1, CONFIG.num_classes]


def _json(inputs, **extra):
    return json.dumps({"inputs": inputs, **extra}).encode(), None


def _image(datatype="UINT8", shape=(1, 28, 28), data=None, name="images"):
    count = int(np.prod(shape))
    return {"name": name, "datatype": datatype, "shape": list(shape), "data": [0] * count if data is None else data}


BAD = {
    "not JSON": ((b"{nope", None), "not JSON"),
    "a JSON list": ((b"[1, 2]", None), "must be a JSON object"),
    "no inputs": (_json([]), "needs inputs"),
    "unknown input": (_json([_image(name="pixels")]), "unknown input 'pixels'"),
    "two inputs": (_json([_image(), _image()]), "2 inputs named 'images'"),
    "wrong datatype": (_json([_image("INT32")]), "datatype 'INT32'"),
    "bad shape": (_json([{**_image(), "shape": "28x28"}]), "needs a shape"),
    "data disagrees with shape": (_json([_image(data=[0] * 700)]), "700 values; shape [1, 28, 28] takes 784"),
    "pixels out of range": (_json([_image(data=[300] * 784)]), "integers from 0 to 255"),
    "non-numeric data": (_json([_image(data=["a"] * 784)]), "must be numbers"),
    "no data": (_json([{"name": "images", "datatype": "UINT8", "shape": [1, 28, 28]}]), "neither data"),
    "wrong image size": (_json([_image(shape=(1, 32, 32))]), "32x32 pixels instead of 28x28"),
    "wrong channels": (_json([_image(shape=(1, 3, 28, 28))]), "3 channels instead of 1"),
    "FP32 without a channel axis": (_json([_image("FP32", (1, 28, 28))]), "3 dimensions instead of 4"),
    "zero images": (_json([_image(shape=(0, 28, 28), data=[])]), "an empty batch"),
    "NaN pixels": (_json([_image("FP32", (1, 1, 28, 28), data=[float("nan")] * 784)]), "NaN or Inf"),
    "unknown output": (_json([_image()], outputs=[{"name": "probs"}]), "unknown output 'probs'"),
    "header length past the body": ((b"{}", "10"), "byte count within the body's 2 bytes"),
    "header length not a number": ((b"{}", "ten"), "byte count"),
}


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
def test_bad_requests_name_their_problem(case):
    (body, header), expected = BAD[case]
    with pytest.raises(ProtocolError, match=re.escape(expected)) as error:
        parse_infer_request(body, header, CONFIG, DATA)
    assert error.value.status == 400


def test_binary_data_must_match_its_declared_size():
    body, header = triton_body(pixels(2), "UINT8")
    with pytest.raises(ProtocolError, match="bytes of binary data follow the JSON header that no input declares"):
        parse_infer_request(body + b"\0", header, CONFIG, DATA)
    with pytest.raises(ProtocolError, match="declares binary_data_size 1568, but 1567 bytes"):
        parse_infer_request(body[:-1], header, CONFIG, DATA)
    spec = json.loads(body[: int(header)])
    spec["inputs"][0]["shape"] = [1, 28, 28]
    text = json.dumps(spec).encode()
    with pytest.raises(ProtocolError, match="1568 bytes of binary data; shape \\[1, 28, 28\\] of UINT8 takes 784"):
        parse_infer_request(text + body[int(header):], str(len(text)), CONFIG, DATA)


def test_image_bodies(tmp_path):
    from PIL import Image

    raw = pixels(1)[0]
    for fmt in ("PNG", "JPEG"):
        Image.fromarray(raw).save(tmp_path / f"x.{fmt}", format=fmt)
        with Image.open(tmp_path / f"x.{fmt}") as image:
            want = eval_array(image, DATA)
        np.testing.assert_array_equal(decode_posted_image((tmp_path / f"x.{fmt}").read_bytes(), DATA)[0], want)
    with pytest.raises(ProtocolError, match="not a PNG or JPEG image") as error:
        decode_posted_image(b"hello", DATA)
    assert error.value.status == 415
    Image.fromarray(raw).save(tmp_path / "x.bmp")
    with pytest.raises(ProtocolError, match="a BMP image; send PNG or JPEG"):
        decode_posted_image((tmp_path / "x.bmp").read_bytes(), DATA)
