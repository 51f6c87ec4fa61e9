"""The Open Inference Protocol (KServe v2, HTTP/REST; what Triton, KServe and MLServer speak) for `dvt serve`:
requests in, responses out, NumPy and the standard library only (no image decoding: an encoded image is
`dvt_cli.images`' to decode), so it is tested without a server.

One input, `images`: UINT8 raw pixels (n, H, W) or (n, C, H, W) at the model's size, normalised here by the
weights' data config (mean and std), or FP32 already normalised (n, C, H, W). Tensor data comes as JSON or through
the binary-data extension (`Inference-Header-Content-Length`: that many bytes of JSON, then the raw tensors in
input order), which `tritonclient` sends by default. Outputs: class_index, label (the class name the weights
record, BYTES), exit, confidence and macs, plus logits when asked for; each as JSON or binary, as the request
says. The model metadata lists both input datatypes and the data config (class names, mean, std, size).

Every problem with a request is a `ProtocolError` carrying its HTTP status and a message naming the problem.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from dvt_shared.image_checks import check_finite, check_image_shape
from dvt_shared.transforms import normalise_pixels

INPUT = "images"
# output name -> datatype; all but logits are sent when a request names none
OUTPUTS = {"class_index": "INT64", "label": "BYTES", "exit": "INT64", "confidence": "FP32", "macs": "INT64",
           "logits": "FP32"}
DEFAULT_OUTPUTS = ("class_index", "label", "exit", "confidence", "macs")
INPUT_DTYPES = {"UINT8": np.dtype("<u1"), "FP32": np.dtype("<f4")}
OUTPUT_DTYPES = {"INT64": np.dtype("<i8"), "FP32": np.dtype("<f4")}
HEADER_LENGTH = "Inference-Header-Content-Length"


class ProtocolError(ValueError):
    """A request the server refuses: `status` is its HTTP status (4xx), the message names the problem."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class InferRequest:
    id: str | None
    images: np.ndarray  # (n, C, H, W) float32, normalised and checked
    outputs: tuple[tuple[str, bool], ...]  # (output name, as binary data) in the order to send


def model_metadata(config, platform: str, data) -> dict:
    """The model metadata response (`GET /v2/models/{name}`): the input in both datatypes it takes (FP32
    normalised, UINT8 raw pixels normalised by the server), the outputs, and the weights' data config."""
    image = list(data.input_size)
    return {
        "name": config.name, "versions": ["1"], "platform": platform,
        "inputs": [{"name": INPUT, "datatype": "FP32", "shape": [-1, *image],
                    "parameters": {"datatypes": list(INPUT_DTYPES), "uint8_shape": [-1, *image]}}],
        "outputs": [{"name": name, "datatype": dtype, "shape": [-1, config.num_classes] if name == "logits" else [-1]}
                    for name, dtype in OUTPUTS.items()],
        "parameters": {"data_config": data.to_dict()},
    }


def _split_body(body: bytes, header_length: str | None) -> tuple[bytes, bytes]:
    if header_length is None:
        return body, b""
    try:
        length = int(header_length)
    except ValueError:
        length = -1
    if not 0 <= length <= len(body):
        raise ProtocolError(f"{HEADER_LENGTH} is {header_length!r}: it must be a byte count within the "
                            f"body's {len(body)} bytes")
    return body[:length], body[length:]


def _json_object(text: bytes) -> dict:
    try:
        request = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProtocolError(f"the request is not JSON: {exc}") from None
    if not isinstance(request, dict):
        raise ProtocolError(f"the request must be a JSON object, got {type(request).__name__}")
    return request


def _shape(spec: dict) -> tuple[int, ...]:
    shape = spec.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                              for d in shape):
        raise ProtocolError(f"input '{INPUT}' needs a shape, a list of sizes >= 0; got {shape!r}")
    return tuple(shape)


def _tensor(spec: dict, binary: memoryview, offset: int) -> tuple[np.ndarray, int]:
    """The input's array and the offset of the next binary tensor."""
    datatype = spec.get("datatype")
    if datatype not in INPUT_DTYPES:
        raise ProtocolError(f"input '{INPUT}' has datatype {datatype!r}; it takes UINT8 (raw pixels) or FP32 "
                            "(normalised)")
    dtype, shape = INPUT_DTYPES[datatype], _shape(spec)
    count = int(np.prod(shape))
    parameters = spec.get("parameters") or {}
    size = parameters.get("binary_data_size") if isinstance(parameters, dict) else None
    if size is not None:
        if not isinstance(size, int) or size < 0 or offset + size > len(binary):
            raise ProtocolError(f"input '{INPUT}' declares binary_data_size {size!r}, but {len(binary) - offset} "
                                "bytes of binary data follow the JSON header")
        if size != count * dtype.itemsize:
            raise ProtocolError(f"input '{INPUT}' has {size} bytes of binary data; shape {list(shape)} of {datatype} "
                                f"takes {count * dtype.itemsize}")
        return np.frombuffer(binary[offset:offset + size], dtype=dtype).reshape(shape), offset + size
    if "data" not in spec:
        raise ProtocolError(f"input '{INPUT}' has neither data nor binary_data_size")
    try:
        values = np.asarray(spec["data"], dtype=np.float64)
    except (TypeError, ValueError):
        raise ProtocolError(f"input '{INPUT}' data must be numbers (a flat or nested list)") from None
    if values.size != count:
        raise ProtocolError(f"input '{INPUT}' has {values.size} values; shape {list(shape)} takes {count}")
    if datatype == "UINT8" and ((values != np.round(values)) | (values < 0) | (values > 255)).any():
        raise ProtocolError(f"input '{INPUT}' is UINT8: its values must be integers from 0 to 255")
    return values.astype(dtype).reshape(shape), offset


def _model_input(array: np.ndarray, config, data) -> np.ndarray:
    """The float32 (n, C, H, W) batch the model takes, checked against its input size; UINT8 pixels normalised by
    the data config `data`."""
    if array.dtype == np.uint8:
        if array.ndim == 3 and config.in_chans == 1:
            array = array[:, None]
        try:
            check_image_shape(array.shape, config)
        except ValueError as exc:
            raise ProtocolError(f"input '{INPUT}' (UINT8 pixels, (n, H, W) or (n, C, H, W)): {exc}") from None
        return normalise_pixels(array, data)
    try:
        check_image_shape(array.shape, config)
        check_finite(np.isfinite(array).reshape(len(array), -1).all(axis=1))
    except ValueError as exc:
        raise ProtocolError(f"input '{INPUT}' (FP32): {exc}") from None
    return np.ascontiguousarray(array, dtype=np.float32)


def _requested_outputs(request: dict) -> tuple[tuple[str, bool], ...]:
    parameters = request.get("parameters") or {}
    binary = bool(parameters.get("binary_data_output", False)) if isinstance(parameters, dict) else False
    outputs = request.get("outputs")
    if outputs is None:
        return tuple((name, binary) for name in DEFAULT_OUTPUTS)
    if not isinstance(outputs, list) or not all(isinstance(o, dict) for o in outputs):
        raise ProtocolError("outputs must be a list of objects with a name")
    chosen = []
    for output in outputs:
        name = output.get("name")
        if name not in OUTPUTS:
            raise ProtocolError(f"unknown output {name!r}; the outputs are {', '.join(OUTPUTS)}")
        flags = output.get("parameters") or {}
        chosen.append((name, bool(flags.get("binary_data", binary)) if isinstance(flags, dict) else binary))
    return tuple(chosen)


def parse_infer_request(body: bytes, header_length: str | None, config, data) -> InferRequest:
    """The images and requested outputs of a `POST /v2/models/{name}/infer` body."""
    text, binary = _split_body(body, header_length)
    request = _json_object(text)
    inputs = request.get("inputs")
    if not isinstance(inputs, list) or not inputs or not all(isinstance(i, dict) for i in inputs):
        raise ProtocolError(f"the request needs inputs: a list holding one tensor named '{INPUT}'")
    names = [i.get("name") for i in inputs]
    unknown = [n for n in names if n != INPUT]
    if unknown or len(names) != 1:
        problem = f"unknown input {unknown[0]!r}" if unknown else f"{len(names)} inputs named '{INPUT}'"
        raise ProtocolError(f"{problem}: {config.name} takes one input, '{INPUT}'")
    array, used = _tensor(inputs[0], memoryview(binary), 0)
    if used != len(binary):
        raise ProtocolError(f"{len(binary) - used} bytes of binary data follow the JSON header that no input "
                            "declares (binary_data_size)")
    request_id = request.get("id")
    return InferRequest(None if request_id is None else str(request_id), _model_input(array, config, data),
                        _requested_outputs(request))


def output_arrays(prediction, data) -> dict[str, np.ndarray]:
    """Every output of a `dvt_shared.adaptive.Prediction`, by name; labels by the data config `data`."""
    labels = np.asarray([data.label(int(c)) for c in prediction.classes], dtype=object)
    return {"class_index": prediction.classes, "label": labels, "exit": prediction.exit_index,
            "confidence": prediction.confidence, "macs": prediction.macs, "logits": prediction.logits}


def _bytes_tensor(strings: np.ndarray) -> bytes:
    """A BYTES tensor in the binary-data extension: each element a 4-byte little-endian length, then its bytes."""
    encoded = [str(s).encode() for s in strings.reshape(-1)]
    return b"".join(len(e).to_bytes(4, "little") + e for e in encoded)


def encode_infer_response(model_name: str, request: InferRequest, prediction, data) -> tuple[bytes, dict[str, str]]:
    """The response body and its headers: JSON, or with binary outputs a JSON header and the raw tensors."""
    arrays = output_arrays(prediction, data)
    outputs, chunks = [], []
    for name, binary in request.outputs:
        datatype = OUTPUTS[name]
        if datatype == "BYTES":
            array = np.asarray(arrays[name], dtype=object)
            raw, values = _bytes_tensor(array), [str(v) for v in array.reshape(-1)]
        else:
            array = np.ascontiguousarray(arrays[name], dtype=OUTPUT_DTYPES[datatype])
            raw, values = None, None
        output = {"name": name, "datatype": datatype, "shape": list(array.shape)}
        if binary:
            chunks.append(raw if raw is not None else array.tobytes())
            output["parameters"] = {"binary_data_size": len(chunks[-1])}
        else:
            output["data"] = values if values is not None else array.reshape(-1).tolist()
        outputs.append(output)
    response = {"model_name": model_name, "model_version": "1", "outputs": outputs}
    if request.id is not None:
        response["id"] = request.id
    header = json.dumps(response, separators=(",", ":")).encode()
    if not chunks:
        return header, {"Content-Type": "application/json"}
    return header + b"".join(chunks), {"Content-Type": "application/octet-stream", HEADER_LENGTH: str(len(header))}
