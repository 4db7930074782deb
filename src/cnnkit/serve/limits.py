"""The bounds on what a client may send, and the error a request gets for passing one: Limits,
RequestError, and an upload's bytes decoded within the pixel bound (413, 415 or 422 otherwise)."""
import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..decode import ImageTooLarge, decode_image


@dataclass
class Limits:
    max_body_bytes: int = 10 * 2**20  # a request's body, all images together
    max_images: int = 64  # images in one request
    max_pixels: int = 40_000_000  # width x height an image header may claim (a 40-megapixel photo)
    timeout_seconds: float = 10.0  # from the body's arrival to the answer
    max_waiting: int = 1024  # images queued for the model; past it, 503 and Retry-After
    max_connections: int = 512  # open connections; past it, uvicorn answers 503


class RequestError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def too_many_images(limit: int) -> str:
    return f"at most {limit} images per request (the server's --max-images); send them in several requests"


def decode_upload(data: bytes, size: int, channels: int, max_pixels: int) -> np.ndarray:
    """uint8 (C, size, size) from an uploaded file's bytes, or a RequestError saying what is wrong."""
    if not data:
        raise RequestError(422, "the image is empty (0 bytes)")
    try:
        return decode_image(io.BytesIO(data), size, channels, max_pixels=max_pixels)
    except (ImageTooLarge, Image.DecompressionBombError) as e:
        raise RequestError(413, f"image too large: {e}") from None
    except UnidentifiedImageError:
        raise RequestError(415, "not an image this server can read (send JPEG, PNG, GIF, BMP, WebP or TIFF)") from None
    except Exception as e:  # truncated or damaged data: the decoder's own reason
        raise RequestError(422, f"the image could not be decoded: {str(e).splitlines()[0][:200]}") from None
