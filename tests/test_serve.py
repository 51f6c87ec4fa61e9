"""`dvt serve` end to end, through `tritonclient`: the command joins the session's Ray instance (fractional CPUs
per replica), serves the shipped DVT on a free local port, answers as the offline engine does whatever shares a
batch, refuses bad requests with 4xx and stays ready, sheds overload with 503, and drains on SIGTERM."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from email.message import Message
from pathlib import Path

import numpy as np
import pytest

from dvt_cli import backends, read_weights
from dvt_shared.data_config import default_data_config
from dvt_shared.datasets import FASHION_MNIST_CLASSES, load_fashion_mnist
from dvt_shared.error_bounds import FP32, decision_agreement
from dvt_shared.exit_policy import MAX_SOFTMAX, softmax

http = pytest.importorskip("tritonclient.http")
pytest.importorskip("ray.serve")

WEIGHTS = Path(__file__).resolve().parents[1] / "weights" / "dvt_t2t_vit_fmnist.safetensors"
MAX_QUEUE = 64


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(ray_address: str, port: int, *extra: str) -> subprocess.Popen:
    """`dvt serve` on `port`, joined to the session's Ray instance, once it answers ready."""
    command = [sys.executable, "-m", "dvt_cli", "serve", "--weights", str(WEIGHTS), "--port", str(port),
               "--ray-address", ray_address, "--replica-cpus", "0.5", "--max-batch", "16", "--max-wait-ms", "2",
               "--max-queue", str(MAX_QUEUE), *extra]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    client = http.InferenceServerClient(f"127.0.0.1:{port}")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if client.is_server_ready():
                return process
        except Exception:  # not listening yet
            pass
        time.sleep(0.5)
    process.kill()
    pytest.fail(f"dvt serve did not become ready:\n{process.communicate()[0][-3000:]}")


def stop(process: subprocess.Popen, timeout: float = 60) -> str:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        return process.communicate(timeout=timeout)[0]
    except subprocess.TimeoutExpired:
        process.kill()
        return process.communicate()[0]


@pytest.fixture(scope="module")
def data():
    fmnist = load_fashion_mnist()
    return fmnist["test_images"][:240], fmnist["test_labels"][:240]


@pytest.fixture(scope="module")
def server(ray_address):
    port = free_port()
    process = start_server(ray_address, port)
    yield process, f"127.0.0.1:{port}"
    stop(process)


@pytest.fixture(scope="module")
def offline():
    """The offline PyTorch engine over the shipped weights and thresholds."""
    config, tensors, metadata, _ = read_weights(str(WEIGHTS))
    return backends.engine("torch", config, tensors, metadata.thresholds), config, tensors


def uint8_input(pixels: np.ndarray, binary: bool = True):
    tensor = http.InferInput("images", list(pixels.shape), "UINT8")
    tensor.set_data_from_numpy(pixels, binary_data=binary)
    return tensor


def raw_post(url: str, body: bytes, headers: dict | None = None) -> tuple[int, Message, dict]:
    """(status, headers, JSON body) of a POST, errors included."""
    request = urllib.request.Request(f"http://{url}", data=body, headers=headers or {}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.headers, json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as error:
        return error.code, error.headers, json.loads(error.read() or b"{}")


def test_health_and_metadata(server, offline):
    _, url = server
    _, config, _ = offline
    client = http.InferenceServerClient(url)
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready(config.name)
    meta = client.get_model_metadata(config.name)
    assert meta["inputs"][0]["name"] == "images" and meta["inputs"][0]["shape"] == [-1, 1, 28, 28]
    assert [o["name"] for o in meta["outputs"]] == ["class_index", "label", "exit", "confidence", "macs", "logits"]
    assert meta["parameters"]["data_config"]["class_names"] == list(FASHION_MNIST_CLASSES)
    with pytest.raises(Exception, match="unknown model 'resnet50'"):
        client.get_model_metadata("resnet50")


def test_concurrent_answers_equal_the_offline_engine_alone(server, offline, data):
    """240 real test images in requests of 1-8 images, 8 in flight at once, as binary UINT8 and JSON: each
    image's class and exit are the offline engine's on that image alone (a borderline exit aside)."""
    _, url = server
    engine, config, _ = offline
    pixels, _ = data
    sizes = np.random.default_rng(0).integers(1, 9, size=80)
    sizes = sizes[np.cumsum(sizes) <= len(pixels)]
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    client = http.InferenceServerClient(url, concurrency=8)
    outputs = [http.InferRequestedOutput(n, binary_data=True) for n in ("class_index", "exit", "macs", "logits")]
    pending = [client.async_infer(config.name, [uint8_input(pixels[s:s + n], binary=i % 3 != 0)], outputs=outputs)
               for i, (s, n) in enumerate(zip(starts, sizes))]
    results = [p.get_result() for p in pending]
    n = int(sizes.sum())
    got = {name: np.concatenate([r.as_numpy(name) for r in results]) for name in ("class_index", "exit", "macs")}
    logits = np.concatenate([r.as_numpy("logits") for r in results])

    from dvt_shared.transforms import normalise_pixels

    images = normalise_pixels(pixels[:n, None], default_data_config(config))
    alone = [engine.predict(images[i:i + 1]) for i in range(n)]
    alone_exit = np.array([p.exit_index[0] for p in alone])
    all_exit = engine.all_exit_logits(images)
    margins = MAX_SOFTMAX.margin(FP32.exit_bounds(config.depth, all_exit))
    agreement = decision_agreement(softmax(all_exit).max(-1), got["exit"], engine.thresholds, margins)
    print(f"exits {np.bincount(got['exit'], minlength=3)}, differ from alone {(got['exit'] != alone_exit).sum()}, "
          f"borderline {agreement.borderline}")
    assert agreement.unexplained.size == 0
    same = got["exit"] == alone_exit
    assert same.sum() >= n - agreement.borderline
    np.testing.assert_array_equal(got["class_index"][same], np.array([p.classes[0] for p in alone])[same])
    np.testing.assert_array_equal(got["macs"], engine.exit_macs[got["exit"]])
    np.testing.assert_allclose(logits[same], np.concatenate([p.logits for p in alone])[same], atol=1e-4)
    stats = client.get_inference_statistics(config.name)["model_stats"][0]["dvt"]
    assert stats["stage_images"][0] >= n and stats["failed"] == 0


def test_fp32_input_and_one_image_file(server, offline, data, tmp_path):
    from PIL import Image

    from dvt_shared.transforms import eval_array

    _, url = server
    engine, config, _ = offline
    pixels, _ = data
    Image.fromarray(pixels[0]).save(tmp_path / "image.png")
    with Image.open(tmp_path / "image.png") as image:
        want = engine.predict(eval_array(image, default_data_config(config))[None])
    status, _, answer = raw_post(f"{url}/v1/predict", (tmp_path / "image.png").read_bytes(),
                                 {"Content-Type": "image/png"})
    assert status == 200, answer
    assert answer["class_index"] == int(want.classes[0]) and answer["exit"] == int(want.exit_index[0])
    assert answer["label"] == FASHION_MNIST_CLASSES[answer["class_index"]] and answer["macs"] == int(want.macs[0])
    tensor = http.InferInput("images", [1, 1, 28, 28], "FP32")
    tensor.set_data_from_numpy(eval_array(Image.fromarray(pixels[0]), default_data_config(config))[None])
    result = http.InferenceServerClient(url).infer(config.name, [tensor])
    assert result.as_numpy("class_index")[0] == want.classes[0] and result.as_numpy("exit")[0] == want.exit_index[0]


def test_bad_requests_get_4xx_and_the_server_stays_ready(server, offline, data):
    from tritonclient.utils import InferenceServerException

    _, url = server
    _, config, _ = offline
    pixels, _ = data
    client = http.InferenceServerClient(url)
    infer = f"{url}/v2/models/{config.name}/infer"
    tritonclient_cases = {
        "unknown input": ([http.InferInput("pixels", [1, 28, 28], "UINT8")], "unknown input 'pixels'"),
        "wrong datatype": ([http.InferInput("images", [1, 28, 28], "INT32")], "datatype 'INT32'"),
        "wrong image size": ([http.InferInput("images", [1, 32, 32], "UINT8")], "32x32 pixels instead of 28x28"),
        "zero images": ([http.InferInput("images", [0, 28, 28], "UINT8")], "an empty batch"),
    }
    for name, (inputs, message) in tritonclient_cases.items():
        shape = inputs[0].shape()
        dtype = {"UINT8": np.uint8, "INT32": np.int32}[inputs[0].datatype()]
        inputs[0].set_data_from_numpy(np.zeros(shape, dtype))
        with pytest.raises(InferenceServerException, match=message) as error:
            client.infer(config.name, inputs)
        assert error.value.status() == "400", name
    with pytest.raises(InferenceServerException, match="unknown model 'nope'") as error:
        client.infer("nope", [uint8_input(pixels[:1])])
    assert error.value.status() == "404"
    with pytest.raises(InferenceServerException, match="unknown output 'probs'"):
        client.infer(config.name, [uint8_input(pixels[:1])], outputs=[http.InferRequestedOutput("probs")])
    raw_cases = [
        (infer, b"{not json", {}, 400, "not JSON"),
        (infer, json.dumps({"inputs": [{"name": "images", "datatype": "UINT8", "shape": [2, 28, 28],
                                        "data": [0] * 784}]}).encode(), {}, 400, "784 values; shape [2, 28, 28]"),
        (infer, b"x" * (8 * 1024 * 1024 + 1), {}, 413, "the limit is 8388608"),
        (infer, json.dumps({"inputs": [{"name": "images", "datatype": "UINT8", "shape": [MAX_QUEUE + 1, 28, 28],
                                        "data": [0] * (784 * (MAX_QUEUE + 1))}]}).encode(), {}, 413,
         "exceed the queue limit"),
        (f"{url}/v1/predict", b"not an image", {}, 415, "not a PNG or JPEG image"),
    ]
    for target, body, headers, status, message in raw_cases:
        got, _, answer = raw_post(target, body, headers)
        assert got == status and message in answer["error"], (got, answer)
    assert client.is_server_ready() and client.infer(config.name, [uint8_input(pixels[:2])]).as_numpy("exit").size == 2


def test_overload_is_refused_with_503_and_retry_after_then_served_again(server, offline, data):
    _, url = server
    _, config, _ = offline
    pixels, _ = data
    body = json.dumps({"inputs": [{"name": "images", "datatype": "UINT8", "shape": [40, 28, 28],
                                   "data": pixels[:40].reshape(-1).tolist()}]}).encode()
    with ThreadPoolExecutor(24) as pool:
        answers = list(pool.map(lambda _: raw_post(f"{url}/v2/models/{config.name}/infer", body), range(48)))
    statuses = [status for status, _, _ in answers]
    refused = [(headers, answer) for status, headers, answer in answers if status == 503]
    assert set(statuses) <= {200, 503} and statuses.count(200) >= 1 and refused, statuses
    assert all(h.get("Retry-After") == "1" and "queue limit" in a["error"] for h, a in refused), refused[:2]
    client = http.InferenceServerClient(url)
    assert client.is_server_ready()
    assert client.infer(config.name, [uint8_input(pixels[:8])]).as_numpy("class_index").size == 8


def test_sigterm_drains_requests_in_flight(server, offline, data):
    """Runs last in this module: it stops the module's server."""
    process, url = server
    _, config, _ = offline
    pixels, _ = data
    client = http.InferenceServerClient(url, concurrency=16)
    pending = [client.async_infer(config.name, [uint8_input(pixels[i * 4:(i + 1) * 4])]) for i in range(16)]
    time.sleep(0.05)
    sent = time.monotonic()
    process.send_signal(signal.SIGTERM)
    results = [p.get_result() for p in pending]
    assert all(r.as_numpy("exit").size == 4 for r in results)
    log = stop(process, timeout=90)
    assert process.returncode == 0, log[-2000:]
    assert "draining" in log and "stopped after" in log
    assert time.monotonic() - sent < 90


@pytest.mark.slow
def test_stop_after_a_request_count(ray_address, offline, data):
    """A second server (about 45 s to start on 2 cores): make test-slow runs it."""
    _, config, _ = offline
    pixels, _ = data
    port = free_port()
    process = start_server(ray_address, port, "--stop-after", "3", "--batching", "cascade")
    client = http.InferenceServerClient(f"127.0.0.1:{port}")
    for i in range(3):
        assert client.infer(config.name, [uint8_input(pixels[i:i + 2])]).as_numpy("exit").size == 2
    log = process.communicate(timeout=90)[0]
    assert process.returncode == 0 and "cascade batching" in log, log[-2000:]
