"""Safe image loading: paths confined to the root, missing / truncated / corrupt files, the pixel cap."""

from __future__ import annotations

import io
import os
import pickle
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmret.data import images
from mmret.data.images import BadImageError, load_image, load_image_bytes, resolve_image_path, unsafe_path_reason

CAP = 1_000_000


def _save(path: Path, size=(16, 12), mode="RGB", fmt="PNG", color=(10, 200, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color=color).save(path, fmt)
    return path


def _noise(size=(64, 48)) -> Image.Image:
    return Image.frombytes("RGB", size, np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), np.uint8))


def _png_claiming(width: int, height: int) -> bytes:
    """A tiny, well-formed-looking PNG whose header claims ``width x height`` (a decompression bomb stand-in)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


@pytest.fixture
def root(tmp_path: Path) -> Path:
    r = tmp_path / "mbeir"
    _save(r / "mbeir_images" / "a.png")
    _save(r / "mbeir_images" / "b.jpg", size=(20, 10), fmt="JPEG")
    _save(r / "mbeir_images" / "gray.png", mode="L", color=128)
    _save(r / "mbeir_images" / "rgba.png", mode="RGBA", color=(1, 2, 3, 4))
    _save(r / "mbeir_images" / "pal.gif", mode="P", fmt="GIF", color=3)
    return r


def _reason(excinfo: pytest.ExceptionInfo[BadImageError]) -> str:
    return excinfo.value.reason


def test_loads_rgb_of_any_mode(root: Path) -> None:
    for name, size in [("a.png", (16, 12)), ("b.jpg", (20, 10)), ("gray.png", (16, 12)), ("rgba.png", (16, 12))]:
        im = load_image(root, f"mbeir_images/{name}", max_pixels=CAP)
        assert im.mode == "RGB" and im.size == size, name
    assert load_image(root, "mbeir_images/a.png", max_pixels=CAP).getpixel((0, 0)) == (10, 200, 30)
    assert load_image(root, "mbeir_images/gray.png", max_pixels=CAP).getpixel((3, 3)) == (128, 128, 128)
    assert load_image(root, "mbeir_images/pal.gif", max_pixels=CAP).mode == "RGB"


@pytest.mark.parametrize(
    "rel",
    [
        "/etc/passwd",
        "\\\\server\\share.png",
        "C:/x.png",
        "../outside.png",
        "mbeir_images/../../outside.png",
        "a\\..\\..\\x",
    ],
)
def test_rejects_unsafe_paths(root: Path, rel: str) -> None:
    (root.parent / "outside.png").write_bytes(b"")  # so that a leak would find a file
    with pytest.raises(BadImageError) as e:
        load_image(root, rel, max_pixels=CAP)
    assert _reason(e) == images.UNSAFE_PATH
    assert repr(rel) in str(e.value)


def test_unsafe_path_reason_is_string_only() -> None:
    assert unsafe_path_reason("mbeir_images/x/y.jpg") is None
    assert unsafe_path_reason("mbeir_images/..hidden/x...jpg") is None  # '..' only as a whole component
    assert unsafe_path_reason("a:b.jpg") is None  # not a drive
    assert unsafe_path_reason("a/..") == "'..' component"
    assert unsafe_path_reason("/abs.jpg") == "absolute path"
    assert unsafe_path_reason("a\x00b") == "contains a NUL character"
    assert unsafe_path_reason("") == unsafe_path_reason(None) == "not a non-empty string"


def test_symlinks_must_stay_inside_the_root(root: Path, tmp_path: Path) -> None:
    secret = _save(tmp_path / "secret" / "s.png")
    os.symlink(secret, root / "mbeir_images" / "link_out.png")
    os.symlink(tmp_path / "secret", root / "mbeir_images" / "dir_out")
    os.symlink(root / "mbeir_images" / "a.png", root / "mbeir_images" / "link_in.png")
    for rel in ["mbeir_images/link_out.png", "mbeir_images/dir_out/s.png"]:
        with pytest.raises(BadImageError) as e:
            load_image(root, rel, max_pixels=CAP)
        assert _reason(e) == images.OUTSIDE_ROOT
    assert load_image(root, "mbeir_images/link_in.png", max_pixels=CAP).size == (16, 12)


def test_a_directory_swapped_for_a_symlink_after_use_is_resolved_again(root: Path, tmp_path: Path) -> None:
    """Directories' real paths are remembered (images.py): one replaced by a symlink out of the root after its
    images were read, or one that now reaches another directory inside the root, is resolved afresh."""
    _save(root / "sub" / "a.png", size=(16, 12))
    assert load_image(root, "sub/a.png", max_pixels=CAP).size == (16, 12)
    _save(tmp_path / "secret" / "a.png", size=(5, 5))
    os.rename(root / "sub", root / "moved")
    os.symlink(tmp_path / "secret", root / "sub")
    with pytest.raises(BadImageError) as e:
        load_image(root, "sub/a.png", max_pixels=CAP)
    assert _reason(e) == images.OUTSIDE_ROOT
    os.remove(root / "sub")
    _save(root / "other" / "a.png", size=(7, 3))
    os.symlink(root / "other", root / "sub")
    assert load_image(root, "sub/a.png", max_pixels=CAP).size == (7, 3)
    assert resolve_image_path(root, "sub/a.png") == (root / "other" / "a.png").resolve()


def test_root_given_through_a_symlink(root: Path, tmp_path: Path) -> None:
    os.symlink(root, tmp_path / "alias")
    assert load_image(tmp_path / "alias", "mbeir_images/a.png", max_pixels=CAP).size == (16, 12)
    assert resolve_image_path(tmp_path / "alias", "mbeir_images/a.png") == (root / "mbeir_images/a.png").resolve()


def test_missing_file_and_directory(root: Path) -> None:
    with pytest.raises(BadImageError) as e:
        load_image(root, "mbeir_images/nope.jpg", max_pixels=CAP)
    assert _reason(e) == images.MISSING and "'mbeir_images/nope.jpg'" in str(e.value)
    with pytest.raises(BadImageError) as e:
        load_image(root, "mbeir_images", max_pixels=CAP)
    assert _reason(e) == images.NOT_A_FILE


@pytest.mark.parametrize("name", ["a.png", "b.jpg"])
def test_truncated_image(root: Path, name: str) -> None:
    path = root / "mbeir_images" / name
    _noise().save(path)  # big enough that half the file cuts into the pixel data, not the header
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(BadImageError) as e:
        load_image(root, f"mbeir_images/{name}", max_pixels=CAP)
    assert _reason(e) == images.CORRUPT


def test_corrupt_and_non_images(root: Path) -> None:
    png = (root / "mbeir_images" / "a.png").read_bytes()
    idat = png.index(b"IDAT")
    broken = png[: idat + 6] + bytes(b ^ 0xFF for b in png[idat + 6 : idat + 20]) + png[idat + 20 :]
    (root / "mbeir_images" / "broken.png").write_bytes(broken)
    (root / "mbeir_images" / "text.jpg").write_bytes(b"this is not an image at all")
    (root / "mbeir_images" / "empty.jpg").write_bytes(b"")
    with pytest.raises(BadImageError) as e:
        load_image(root, "mbeir_images/broken.png", max_pixels=CAP)
    assert _reason(e) == images.CORRUPT
    for name in ["text.jpg", "empty.jpg"]:
        with pytest.raises(BadImageError) as e:
            load_image(root, f"mbeir_images/{name}", max_pixels=CAP)
        assert _reason(e) == images.NOT_AN_IMAGE


def test_pixel_cap_on_a_real_image(root: Path) -> None:
    assert load_image(root, "mbeir_images/a.png", max_pixels=16 * 12).size == (16, 12)  # at the cap: fine
    with pytest.raises(BadImageError) as e:
        load_image(root, "mbeir_images/a.png", max_pixels=16 * 12 - 1)
    assert _reason(e) == images.TOO_LARGE and "16x12 = 192 > 191" in str(e.value)


def test_bomb_header_rejected_before_decoding(root: Path) -> None:
    (root / "mbeir_images" / "bomb.png").write_bytes(_png_claiming(60_000, 60_000))
    with pytest.raises(BadImageError) as e:
        load_image(root, "mbeir_images/bomb.png", max_pixels=images.DEFAULT_MAX_PIXELS)
    assert _reason(e) == images.TOO_LARGE
    # Our cap above PIL's own limits: PIL's DecompressionBombError becomes the same error.
    with pytest.raises(BadImageError) as e:
        load_image(root, "mbeir_images/bomb.png", max_pixels=10**12)
    assert _reason(e) == images.TOO_LARGE and "decompression bomb" in str(e.value).lower()


def test_pil_bomb_warning_becomes_an_error(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 16x12 = 192: above it, below twice it (warning zone)
    with pytest.raises(BadImageError) as e:
        load_image(root, "mbeir_images/a.png", max_pixels=CAP)
    assert _reason(e) == images.TOO_LARGE
    assert isinstance(e.value.__cause__, Image.DecompressionBombWarning)


def test_load_image_bytes() -> None:
    buf = io.BytesIO()
    Image.new("RGB", (7, 5), (1, 2, 3)).save(buf, "PNG")
    im = load_image_bytes(buf.getvalue(), max_pixels=CAP, name="shard-3/record-17")
    assert im.mode == "RGB" and im.size == (7, 5) and im.getpixel((0, 0)) == (1, 2, 3)
    buf = io.BytesIO()
    _noise().save(buf, "JPEG")
    data = buf.getvalue()
    cases = [
        (data[: len(data) // 2], images.CORRUPT),
        (b"\x00" * 10, images.NOT_AN_IMAGE),
        ("str", images.NOT_AN_IMAGE),
    ]
    for bad, reason in cases:
        with pytest.raises(BadImageError) as e:
            load_image_bytes(bad, max_pixels=CAP, name="shard-3/record-17")
        assert _reason(e) == reason and "'shard-3/record-17'" in str(e.value)
    with pytest.raises(BadImageError) as e:
        load_image_bytes(_png_claiming(5000, 5000), max_pixels=CAP, name="bomb")
    assert _reason(e) == images.TOO_LARGE


def test_error_type_and_pickling() -> None:
    err = BadImageError("x/y.jpg", images.MISSING, "under /data")
    assert isinstance(err, ValueError)
    back = pickle.loads(pickle.dumps(err))
    assert (back.path, back.reason, back.detail, str(back)) == (err.path, err.reason, err.detail, str(err))
    assert str(err) == "image 'x/y.jpg': missing file (under /data)"
