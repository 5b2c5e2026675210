"""Turn untrusted bytes into an image, or into a 4xx that says what was wrong.

``cv2.imdecode`` alone is not enough for a public endpoint: it decodes a
truncated JPEG into an image with a gray bottom and no error, and it will
allocate whatever a header claims. So the size is read from the header first
(a decompression bomb is refused before any pixel is decoded) and the file's
end is checked before decoding.
"""

from __future__ import annotations

import zlib

import cv2
import numpy as np

DEFAULT_MAX_PIXELS = 40_000_000
PADDING = b" \t\r\n\x00"
# Start-of-frame markers carry the size; C4 (DHT), C8 (JPG) and CC (DAC) do not.
JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
JPEG_STANDALONE = frozenset({0x01, *range(0xD0, 0xD8)})
BMP_HEADER_SIZES = frozenset({12, 16, 40, 52, 56, 64, 108, 124})
# The smallest GIF (1x1): decoding it tells whether this OpenCV build reads GIF at all.
TINY_GIF = (
    b"GIF89a\x01\x00\x01\x00\x80\x00\x00\x00\x00\x00\xff\xff\xff!\xf9\x04\x01\x00\x00\x00"
    b"\x00,\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02D\x01\x00;"
)


class BadInput(ValueError):
    """The caller's mistake: ``status`` is the HTTP status to answer with (400 or 413)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _decodes(data: bytes) -> bool:
    try:
        return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR) is not None
    except cv2.error:
        return False


GIF_SUPPORTED = _decodes(TINY_GIF)
SUPPORTED = "JPEG, PNG, BMP, WebP or GIF" if GIF_SUPPORTED else "JPEG, PNG, BMP or WebP"


def sniff(data: bytes) -> str | None:
    """The image format by magic number, or ``None``.

    BMP's two-byte ``BM`` is weak, so its header size is checked too: text that
    merely starts with ``BM`` is not taken for a bitmap.
    """
    if data[:3] == b"\xff\xd8\xff":
        return "JPEG"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "PNG"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WebP"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if data[:2] == b"BM" and len(data) >= 26 and _u32le(data, 14) in BMP_HEADER_SIZES:
        return "BMP"
    return None


def _u16le(data: bytes, at: int) -> int:
    return int.from_bytes(data[at : at + 2], "little")


def _u32le(data: bytes, at: int) -> int:
    return int.from_bytes(data[at : at + 4], "little")


def _u16be(data: bytes, at: int) -> int:
    return int.from_bytes(data[at : at + 2], "big")


def _u32be(data: bytes, at: int) -> int:
    return int.from_bytes(data[at : at + 4], "big")


def _broken(fmt: str, why: str) -> BadInput:
    return BadInput(400, f"image is truncated or corrupt ({fmt}: {why})")


def _jpeg_header(data: bytes) -> tuple[int, int, int]:
    """(width, height, offset of the first scan) from the JPEG's marker segments."""
    size: tuple[int, int] | None = None
    i, n = 2, len(data)
    while i < n:
        if data[i] != 0xFF:
            raise _broken("JPEG", f"no marker at byte {i}")
        while i < n and data[i] == 0xFF:  # fill bytes
            i += 1
        if i >= n:
            break
        marker = data[i]
        i += 1
        if marker in JPEG_STANDALONE:
            continue
        if marker == 0xD9:
            raise _broken("JPEG", "end of image before any scan")
        if i + 2 > n:
            break
        length = _u16be(data, i)
        if length < 2:
            raise _broken("JPEG", f"segment length {length} at byte {i}")
        if marker in JPEG_SOF:
            if i + 7 > n:
                break
            size = (_u16be(data, i + 5), _u16be(data, i + 3))
        if marker == 0xDA:
            if size is None:
                raise _broken("JPEG", "scan before the frame header")
            return size[0], size[1], i + length
        i += length
    raise _broken("JPEG", "file ends inside its headers")


def _png_size(data: bytes) -> tuple[int, int]:
    if len(data) < 24 or data[12:16] != b"IHDR":
        raise _broken("PNG", "no IHDR header")
    return _u32be(data, 16), _u32be(data, 20)


def _png_check(data: bytes) -> None:
    """Walk every chunk, checking its CRC, up to IEND: a cut or damaged file fails here."""
    i, n = 8, len(data)
    while i + 12 <= n:
        length = _u32be(data, i)
        kind = data[i + 4 : i + 8]
        end = i + 8 + length
        if end + 4 > n:
            break
        if zlib.crc32(data[i + 4 : end]) != _u32be(data, end):
            raise _broken("PNG", f"bad CRC in {kind.decode('latin-1')!r} chunk at byte {i}")
        if kind == b"IEND":
            return
        i = end + 4
    raise _broken("PNG", "file ends before the IEND chunk")


def _bmp_size(data: bytes) -> tuple[int, int]:
    if _u32le(data, 14) == 12:  # OS/2 BITMAPCOREHEADER: 16-bit sides
        return _u16le(data, 18), _u16le(data, 20)
    width = int.from_bytes(data[18:22], "little", signed=True)
    height = int.from_bytes(data[22:26], "little", signed=True)  # negative: top-down
    if width < 0:
        raise _broken("BMP", f"negative width {width}")
    return width, abs(height)


def _bmp_check(data: bytes, width: int, height: int) -> None:
    header = _u32le(data, 14)
    if header < 40 or len(data) < 34:
        return
    bits, compression = _u16le(data, 28), _u32le(data, 30)
    if compression in (0, 3):  # uncompressed rows: the pixel array's size is known
        row = (width * bits + 31) // 32 * 4
        if _u32le(data, 10) + row * height > len(data):
            raise _broken("BMP", "pixel data is shorter than the header says")


def _webp_size(data: bytes) -> tuple[int, int]:
    kind = data[12:16]
    if kind == b"VP8 " and len(data) >= 30 and data[23:26] == b"\x9d\x01\x2a":
        return _u16le(data, 26) & 0x3FFF, _u16le(data, 28) & 0x3FFF
    if kind == b"VP8L" and len(data) >= 25 and data[20] == 0x2F:
        bits = _u32le(data, 21)
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if kind == b"VP8X" and len(data) >= 30:
        return int.from_bytes(data[24:27], "little") + 1, int.from_bytes(data[27:30], "little") + 1
    raise _broken("WebP", "no VP8/VP8L/VP8X header")


def image_size(data: bytes, fmt: str) -> tuple[int, int]:
    """(width, height) from the file's header alone, without decoding pixels."""
    if fmt == "JPEG":
        width, height, _ = _jpeg_header(data)
        return width, height
    if fmt == "PNG":
        return _png_size(data)
    if fmt == "BMP":
        return _bmp_size(data)
    if fmt == "WebP":
        return _webp_size(data)
    if fmt == "GIF":
        return _u16le(data, 6), _u16le(data, 8)
    raise ValueError(f"unknown format {fmt!r}")


def check_complete(data: bytes, fmt: str) -> None:
    """Refuse a file that was cut short: decoders would quietly fill in the rest."""
    if fmt == "JPEG":
        width, height, scan = _jpeg_header(data)
        # EOI after the first scan; data after it (padding, a camera's trailer) is allowed.
        # Inside scan data 0xFF is always escaped, so FF D9 there can only be EOI.
        if data.rfind(b"\xff\xd9", scan) < 0:
            raise _broken("JPEG", "no end-of-image marker: the file was cut short")
    elif fmt == "PNG":
        _png_check(data)
    elif fmt == "BMP":
        width, height = _bmp_size(data)
        _bmp_check(data, width, height)
    elif fmt == "WebP":
        if len(data) < 8 + _u32le(data, 4):
            raise _broken("WebP", "file is shorter than its RIFF header says")
    elif fmt == "GIF" and not data.rstrip(PADDING).endswith(b";"):
        raise _broken("GIF", "no trailer: the file was cut short")


def decode_image(
    data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, source: str = "body"
) -> np.ndarray:
    """A BGR image from encoded bytes, or :class:`BadInput` saying why not.

    ``source`` names where the bytes came from, for the message when they are
    not an image at all (e.g. ``"decoded body"``).
    """
    if not data:
        raise BadInput(400, f"{source} is empty: there is no image in it")
    fmt = sniff(data)
    if fmt is None:
        start = data[:4].hex(" ")
        raise BadInput(
            400,
            f"{source} is not a decodable image: it starts with bytes {start or '(none)'}, "
            f"not a {SUPPORTED} signature",
        )
    if fmt == "GIF" and not GIF_SUPPORTED:
        raise BadInput(400, f"GIF is not supported by this OpenCV build; send {SUPPORTED}")
    width, height = image_size(data, fmt)
    if width <= 0 or height <= 0:
        raise _broken(fmt, f"header says {width}x{height} pixels")
    if width * height > max_pixels:
        raise BadInput(
            413,
            f"image is {width}x{height} = {width * height} pixels, over this function's limit "
            f"of {max_pixels} (SSD_MAX_PIXELS); send a smaller image",
        )
    check_complete(data, fmt)
    try:
        image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    except cv2.error as exc:
        raise _broken(fmt, f"OpenCV: {str(exc).strip()}") from None
    if image is None:
        raise _broken(fmt, "OpenCV could not decode it")
    # EXIF orientation may swap the sides; anything else means the header lied.
    if image.shape[0] * image.shape[1] != width * height:
        raise _broken(
            fmt, f"decoded {image.shape[1]}x{image.shape[0]} but header says {width}x{height}"
        )
    return image


def encode_jpeg(image: np.ndarray, quality: int = 90) -> bytes:
    """JPEG bytes of a BGR image."""
    ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise RuntimeError("OpenCV could not encode the JPEG")
    return buf.tobytes()
