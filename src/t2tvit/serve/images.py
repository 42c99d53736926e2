"""Request bodies to RGB images, with every way a body can be wrong answered by a 4xx and a reason.

Pillow reads only the header on ``Image.open``, so the pixel count is checked against Pillow's
decompression-bomb limit (``Image.MAX_IMAGE_PIXELS``) before a single pixel is decoded. Truncated
files are refused (``ImageFile.LOAD_TRUNCATED_IMAGES`` stays off): half a photo classified as if it
were whole is a silent wrong answer.
"""
import io

from PIL import Image, UnidentifiedImageError

MAX_UPLOAD_BYTES = 20 * 1024 * 1024
RAW_TYPES = ('application/octet-stream',)
ACCEPTED = 'multipart/form-data (a file field), image/* or application/octet-stream (the raw bytes)'


class BadInput(Exception):
    """A request the server refuses: ``status`` (4xx) and a message naming the problem and the fix."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def too_large(size: int) -> BadInput:
    return BadInput(413, f'the upload is {size} bytes, over the limit of {MAX_UPLOAD_BYTES} bytes (20 MB); '
                         'send a smaller image')


def check_content_type(content_type: str) -> str:
    """'multipart' or 'raw' for the types the API takes; 415 for any other."""
    kind = content_type.split(';')[0].strip().lower()
    if kind == 'multipart/form-data':
        return 'multipart'
    if not kind or kind.startswith('image/') or kind in RAW_TYPES:
        return 'raw'
    raise BadInput(415, f'content type {kind!r} is not accepted: send {ACCEPTED}, e.g. curl -F file=@cat.jpg URL')


def decode_image(data: bytes) -> Image.Image:
    """The body as an RGB image (grayscale, palette, CMYK, 16-bit and alpha converted; transparency on white)."""
    from ..data import to_rgb
    if not data:
        raise BadInput(400, 'empty body: send an image, e.g. curl -F file=@cat.jpg URL '
                            'or curl --data-binary @cat.jpg -H "Content-Type: image/jpeg" URL')
    try:
        img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise BadInput(413, f'{e}; send a smaller image') from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        raise BadInput(400, f'not an image: Pillow cannot identify the {len(data)} bytes sent; '
                            'send a JPEG, PNG, WebP, GIF, BMP or TIFF file') from None
    pixels = img.width * img.height
    limit = Image.MAX_IMAGE_PIXELS
    if limit and pixels > limit:
        raise BadInput(413, f'the image is {img.width}x{img.height} = {pixels} pixels, over the limit of {limit} '
                            '(a decompression bomb, refused before decoding); send a smaller image')
    try:
        img.load()
    except (OSError, ValueError, SyntaxError) as e:
        raise BadInput(400, f'the {img.format or "image"} file is truncated or corrupt ({e}); send the whole file') \
            from None
    return to_rgb(img)
