"""`dvt predict --ray`: Ray Data gives the rows single-process `dvt predict --out` gives, for image files,
folders of images and parquet files of encoded images; inputs that are none of these are refused before
Ray runs anything."""
import io
import os

import numpy as np
import pytest

pytest.importorskip("ray")
pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

from PIL import Image  # noqa: E402

from dvt_cli import main  # noqa: E402
from dvt_shared.datasets import DEFAULT_FASHION_MNIST_DIR  # noqa: E402

N_IMAGES = 20
EXACT = ["path", "class_index", "label", "exit", "macs"]


@pytest.fixture(scope="module")
def weights():
    """The shipped Fashion-MNIST DVT, with its calibrated thresholds."""
    from dvt_cli import CommandError
    from dvt_cli.demo import shipped_weights

    try:
        return str(shipped_weights("dvt")[0])
    except CommandError as exc:
        pytest.skip(f"no shipped weights: {exc}")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """The first Fashion-MNIST test images as PNGs: every third in sub/, every ninth in sub/deeper/,
    beside files a folder input skips (no image extension, hidden)."""
    if not os.path.isdir(DEFAULT_FASHION_MNIST_DIR):
        pytest.skip("Fashion-MNIST (Debian package dataset-fashion-mnist) is not installed")
    from dvt_shared.datasets import load_fashion_mnist

    images = load_fashion_mnist()["test_images"][:N_IMAGES]
    root = tmp_path_factory.mktemp("fmnist")
    (root / "sub" / "deeper").mkdir(parents=True)
    for i, pixels in enumerate(images):
        where = "sub/deeper" if i % 9 == 0 else "sub" if i % 3 == 0 else ""
        Image.fromarray(pixels).save(root / where / f"t{i:02d}.png")
    (root / "sub" / "notes.txt").write_text("not an image")
    (root / "sub" / ".hidden.png").write_bytes(b"not pixels either")
    return root


def top_files(folder) -> list[str]:
    return sorted(str(p) for p in folder.glob("t*.png"))


def walked(folder) -> list[str]:
    """The images a folder input reads, in its order: each folder's files by name, then its subfolders."""
    return top_files(folder) + [str(p) for sub in (folder / "sub", folder / "sub" / "deeper")
                                for p in sorted(sub.glob("t*.png"))]


def single_process(weights, paths, out) -> "pa.Table":
    assert main(["predict", "--weights", weights, *paths, "--out", str(out)]) == 0
    return pq.read_table(out)


def on_ray(weights, inputs, out, *options) -> "pa.Table":
    assert main(["predict", "--ray", "--weights", weights, *map(str, inputs), "--out", str(out), *options]) == 0
    return pq.read_table(out)


def assert_same_rows(ray_rows: "pa.Table", expected: "pa.Table") -> None:
    """Path, class, label, exit and multiply-adds equal; confidence equal to float32 rounding (the engine
    ran other batches on Ray)."""
    assert ray_rows.schema == expected.schema
    for name in EXACT:
        assert ray_rows[name].to_pylist() == expected[name].to_pylist(), name
    np.testing.assert_allclose(ray_rows["confidence"].to_numpy(), expected["confidence"].to_numpy(),
                               rtol=0, atol=1e-5)


def test_rows_equal_single_process_predict(weights, folder, ray_address, tmp_path, capsys):
    """Image files and a folder (read recursively, images by extension, hidden files skipped, in walk
    order) give the rows single-process `dvt predict --out` gives, on two actors in batches of three."""
    paths = walked(folder)
    expected = single_process(weights, paths, tmp_path / "single.parquet")
    assert expected.schema.names == ["path", "class_index", "label", "exit", "confidence", "macs"]
    assert expected.num_rows == N_IMAGES and len(set(expected["exit"].to_pylist())) > 1
    capsys.readouterr()
    rows = on_ray(weights, [*top_files(folder), folder / "sub"], tmp_path / "ray.parquet",
                  "--ray-address", ray_address, "--batch-size", "3", "--actors", "2")
    assert_same_rows(rows, expected)
    assert capsys.readouterr().out.startswith(f"wrote {N_IMAGES} rows to {tmp_path / 'ray.parquet'}: exits [")


@pytest.mark.slow
def test_parquet_inputs(weights, folder, ray_address, tmp_path):
    """Encoded images in a binary column 'image' named by a 'path' column, or in 'bytes' without one:
    then rows are named FILE#ROW. Consecutive files of one layout are one read; rows stay in input order."""
    paths = walked(folder)
    expected = single_process(weights, paths, tmp_path / "single.parquet")
    encoded = [open(p, "rb").read() for p in paths]
    named, numbered = tmp_path / "named.parquet", tmp_path / "numbered.parquet"
    pq.write_table(pa.table({"path": paths[:8], "image": encoded[:8], "label": list(range(8))}), named)
    pq.write_table(pa.table({"bytes": encoded[8:]}), numbered)
    rows = on_ray(weights, [named, numbered], tmp_path / "ray.parquet")
    assert rows["path"].to_pylist()[8:] == [f"{numbered}#{i}" for i in range(N_IMAGES - 8)]
    renamed = rows.set_column(0, "path", pa.array(paths))
    assert_same_rows(renamed, expected)


def test_an_image_that_does_not_decode_stops_the_run(weights, folder, ray_address, tmp_path, capsys):
    """A file whose header reads as a PNG but whose pixels do not is found by the worker decoding it;
    the run stops naming it, and --out is not written."""
    good = top_files(folder)[0]
    broken = tmp_path / "broken.png"
    broken.write_bytes(open(good, "rb").read()[:60])
    out = tmp_path / "ray.parquet"
    assert main(["predict", "--ray", "--weights", weights, good, str(broken), "--out", str(out)]) == 1
    assert f"{broken}: cannot read it as an image" in capsys.readouterr().err
    assert not out.exists()


def _missing(tmp_path):
    return tmp_path / "absent.png"


def _text_file(tmp_path):
    (tmp_path / "notes.txt").write_text("notes")
    return tmp_path / "notes.txt"


def _empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("notes")
    return tmp_path / "empty"


def _not_parquet(tmp_path):
    (tmp_path / "x.parquet").write_bytes(b"PAR1 nonsense")
    return tmp_path / "x.parquet"


def _strings_parquet(tmp_path):
    pq.write_table(pa.table({"image": ["a string, not bytes"]}), tmp_path / "strings.parquet")
    return tmp_path / "strings.parquet"


@pytest.mark.parametrize("make,message", [
    (_missing, "{} is neither an image file, a folder of images nor a parquet file of encoded images "
               "(it does not exist)"),
    (_text_file, "{} is neither an image file, a folder of images nor a parquet file of encoded images"),
    (_empty_folder, "{} is a folder without images (.png, .jpg"),
    (_not_parquet, "{}: cannot read it as a parquet file"),
    (_strings_parquet, "{} has no binary column 'image' or 'bytes' of encoded images"),
], ids=["missing", "text file", "empty folder", "not parquet", "no image column"])
def test_bad_input_is_refused_before_ray_runs(weights, tmp_path, capsys, make, message):
    target = make(tmp_path)
    out = tmp_path / "out.parquet"
    assert main(["predict", "--ray", "--weights", weights, str(target), "--out", str(out)]) == 1
    assert message.format(target) in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("argv,message", [
    (["--ray"], "--ray writes its rows to a parquet file: pass --out FILE.parquet"),
    (["--actors", "2", "--batch-size", "8"], "--actors, --batch-size apply only with --ray"),
    (["--ray", "--out", "/nonexistent/out.parquet"], "cannot write /nonexistent/out.parquet"),
])
def test_ray_options_are_checked_first(weights, tmp_path, capsys, argv, message):
    image = tmp_path / "x.png"
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(image)
    assert main(["predict", "--weights", weights, str(image), *argv]) == 1
    assert message in capsys.readouterr().err


def test_decode_reads_pixels_by_the_data_config(folder):
    """`decode_image` (both paths' decoder) against PIL and the formula: pixels / 255, less the data config's mean,
    over its std; an unreadable body is named."""
    from PIL import Image

    from dvt_cli.images import decode_image, load_images
    from dvt_shared.data_config import DataConfig

    data = DataConfig((1, 28, 28), (0.25,), (0.5,))
    path = walked(folder)[0]
    with open(path, "rb") as handle:
        encoded = handle.read()
    want = (np.asarray(Image.open(path).convert("L"), dtype=np.float32) / 255 - np.float32(0.25)) / np.float32(0.5)
    np.testing.assert_allclose(decode_image(encoded, data, path)[0], want, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(load_images([path], data)[0], decode_image(encoded, data, path))
    with pytest.raises(Exception, match="x: cannot read it as an image"):
        decode_image(io.BytesIO(b"junk").getvalue(), data, "x")
