"""Generated images as a response carries them: encoded (PNG, WebP or JPEG) and, for
`response_format: "url"`, kept in memory for a bounded time and size behind unguessable links
(`GET /v1/images/files/{id}`), as OpenAI's expiring links are (docs/serving.md ("OpenAI compatibility"))."""

from __future__ import annotations

import io
import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

FILES_PATH = "/v1/images/files/"  # + the image's id; open without an API key: the id is the secret
MEDIA_TYPES = {"png": "image/png", "webp": "image/webp", "jpeg": "image/jpeg"}
URL_TTL_S = 600.0  # how long a link answers (serve --url-ttl-s)
URL_STORE_BYTES = 256 << 20  # at most this much image data is kept; the oldest go first


def encode_image(image: np.ndarray, output_format: str = "png", compression: int = 100) -> bytes:
    """An RGB image in `output_format`; `compression` (OpenAI's 0..100) is the lossy formats' quality."""
    from PIL import Image

    buffer = io.BytesIO()
    options = {} if output_format == "png" else {"quality": max(1, min(100, compression))}
    Image.fromarray(image).save(buffer, format=output_format.upper(), **options)
    return buffer.getvalue()


@dataclass(frozen=True)
class StoredImage:
    data: bytes
    media_type: str
    expires: float  # time.monotonic()


class ImageStore:
    """Images behind links for `ttl_s` seconds, at most `max_bytes` of them (thread-safe)."""

    def __init__(self, ttl_s: float = URL_TTL_S, max_bytes: int = URL_STORE_BYTES) -> None:
        self.ttl_s, self.max_bytes = ttl_s, max_bytes
        self._images: OrderedDict[str, StoredImage] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def put(self, data: bytes, output_format: str) -> str:
        """Keep one encoded image; its id (128 random bits, URL-safe)."""
        image_id = secrets.token_urlsafe(16) + "." + output_format
        stored = StoredImage(data, MEDIA_TYPES[output_format], time.monotonic() + self.ttl_s)
        with self._lock:
            self._expire(time.monotonic())
            self._images[image_id] = stored
            self._bytes += len(data)
            while self._bytes > self.max_bytes and len(self._images) > 1:
                self._drop(next(iter(self._images)))
        return image_id

    def get(self, image_id: str) -> StoredImage | None:
        """The image, or None once it expired, was pushed out, or never existed."""
        with self._lock:
            self._expire(time.monotonic())
            return self._images.get(image_id)

    def __len__(self) -> int:
        with self._lock:
            return len(self._images)

    def _expire(self, now: float) -> None:
        while self._images:
            oldest = next(iter(self._images))
            if self._images[oldest].expires > now:
                break
            self._drop(oldest)

    def _drop(self, image_id: str) -> None:
        self._bytes -= len(self._images.pop(image_id).data)
