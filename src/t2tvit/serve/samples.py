"""Built-in sample images for the page, made on the spot: nothing is downloaded or shipped as a binary.

Four held-out handwritten digits (scikit-learn's 8x8 digits, upsampled as the demo's data is) and
three pictures drawn with PIL, so a model trained on the digits and an ImageNet model both have
something to look at.
"""
import io
from functools import lru_cache
from typing import Dict, Tuple

from PIL import Image, ImageDraw

SIZE = 224


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format='PNG')
    return buf.getvalue()


def _digits(count: int = 4) -> Dict[str, Tuple[bytes, str]]:
    from ..data import DigitsImages
    images = DigitsImages(train=False, size=32)
    out: Dict[str, Tuple[bytes, str]] = {}
    seen = set()
    for i, target in enumerate(images.targets):
        if target in seen or target not in (0, 3, 4, 7):
            continue
        seen.add(target)
        out[f'digit_{target}'] = (_png(images.image(i)), f'handwritten digit {target} (held out)')
        if len(out) == count:
            break
    return out


def _drawn() -> Dict[str, Tuple[bytes, str]]:
    sun = Image.new('RGB', (SIZE, SIZE), (90, 150, 230))
    d = ImageDraw.Draw(sun)
    d.rectangle([0, 170, SIZE, SIZE], fill=(60, 140, 70))
    d.ellipse([120, 30, 190, 100], fill=(250, 210, 40))

    checker = Image.new('RGB', (SIZE, SIZE), (250, 250, 250))
    d = ImageDraw.Draw(checker)
    step = SIZE // 8
    for r in range(8):
        for c in range(8):
            if (r + c) % 2:
                d.rectangle([c * step, r * step, (c + 1) * step - 1, (r + 1) * step - 1], fill=(20, 20, 20))

    target = Image.new('RGB', (SIZE, SIZE), (255, 255, 255))
    d = ImageDraw.Draw(target)
    for i, colour in enumerate([(200, 30, 30), (255, 255, 255)] * 3):
        m = 12 + i * 17
        d.ellipse([m, m, SIZE - m, SIZE - m], fill=colour)
    return {'sunny_field': (_png(sun), 'drawn: sun over a field'),
            'checkerboard': (_png(checker), 'drawn: checkerboard'),
            'target': (_png(target), 'drawn: red rings')}


@lru_cache(maxsize=1)
def samples() -> Dict[str, Tuple[bytes, str]]:
    """``{name: (PNG bytes, description)}``."""
    return {**_digits(), **_drawn()}
