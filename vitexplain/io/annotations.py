"""Ground-truth annotations for ``evaluate``: boxes (Pascal VOC XML files, or one COCO-style JSON) and masks.

- ``--boxes DIR``: one ``{stem}.xml`` per image in Pascal VOC form (ImageNet's validation boxes come so):
  ``<size><width/><height/></size>`` and ``<object><name/><bndbox><xmin/><ymin/><xmax/><ymax/></bndbox></object>``,
  1-based pixel coordinates, both ends included.
- ``--boxes FILE.json``: COCO-style, ``images`` (``id``, ``file_name``, ``width``, ``height``), ``annotations``
  (``image_id``, ``category_id``, ``bbox`` ``[x, y, w, h]`` in pixel-edge coordinates) and ``categories``
  (``id``, ``name``); images are matched by the file name's stem.
- ``--masks DIR``: one ``{stem}.png`` per image, non-zero pixels are the object.

A box's label is what the file says (a class index, a class name, or an ImageNet synset id such as
``n02108422``); the evaluation resolves it against the model's classes. A box covers the pixels whose centres
lie inside it. Problems with one image's annotation are that image's (:class:`AnnotationProblem`); an unusable
``--boxes`` or ``--masks`` argument is :class:`AnnotationError`.
"""
from __future__ import annotations

import json
import math
import os
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


class AnnotationError(ValueError):
    """An unusable ``--boxes`` or ``--masks`` argument (a usage error: nothing is computed)."""


class AnnotationProblem(ValueError):
    """One image's annotation cannot be used (reported for that image; the others go on)."""


@dataclass(frozen=True)
class Box:
    label: str
    x0: float  # pixel edges: the box spans [x0, x1) × [y0, y1)
    y0: float
    x1: float
    y1: float


@dataclass
class ImageBoxes:
    size: tuple[int, int] | None  # (width, height) as the annotation states it
    boxes: list[Box] = field(default_factory=list)


def box_region(boxes: list[Box], height: int, width: int) -> np.ndarray:
    """``(H, W)`` bool: the pixels whose centres lie inside any of ``boxes``."""
    region = np.zeros((height, width), dtype=bool)
    for box in boxes:
        left, right = (min(max(0, math.ceil(edge - 0.5)), width) for edge in (box.x0, box.x1))
        top, bottom = (min(max(0, math.ceil(edge - 0.5)), height) for edge in (box.y0, box.y1))
        region[top:bottom, left:right] = True
    return region


def read_voc(path: Path) -> ImageBoxes:
    """One Pascal VOC XML file; :class:`AnnotationProblem` saying what is wrong with it."""
    try:
        root = ElementTree.parse(path).getroot()
        size = root.find("size")
        stated = (int(size.findtext("width")), int(size.findtext("height"))) if size is not None else None
        boxes = []
        for item in root.iter("object"):
            box = item.find("bndbox")
            xmin, ymin, xmax, ymax = (float(box.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax"))
            boxes.append(Box(item.findtext("name", "").strip(), xmin - 1, ymin - 1, xmax, ymax))
    except (ElementTree.ParseError, OSError) as error:
        raise AnnotationProblem(f"cannot read {path.name}: {error}") from None
    except (AttributeError, TypeError, ValueError):
        raise AnnotationProblem(f"{path.name} is not a Pascal VOC annotation (size, object/name, bndbox)") from None
    return ImageBoxes(stated, boxes)


def read_coco(path: Path) -> dict[str, ImageBoxes]:
    """A COCO-style JSON file: boxes by image stem; :class:`AnnotationError` if it is not one."""
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
        names = {c["id"]: str(c["name"]) for c in document.get("categories", [])}
        images = {i["id"]: (Path(i["file_name"]).stem, (int(i["width"]), int(i["height"])) if "width" in i else None)
                  for i in document["images"]}
        found = {stem: ImageBoxes(size) for stem, size in images.values()}
        for note in document.get("annotations", []):
            stem = images[note["image_id"]][0]
            x, y, w, h = (float(v) for v in note["bbox"])
            label = names.get(note["category_id"], str(note["category_id"]))
            found[stem].boxes.append(Box(label, x, y, x + w, y + h))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise AnnotationError(f"--boxes {path}: cannot read it as JSON ({error})") from None
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise AnnotationError(f"--boxes {path}: not COCO-style JSON (images, annotations, categories): {error!r}") from None
    return found


class GroundTruth:
    """The annotations of ``evaluate``'s inputs, looked up by the image's stem."""

    def __init__(self, boxes: Path | None = None, masks: Path | None = None):
        self.coco: dict[str, ImageBoxes] | None = None
        self.voc: dict[str, Path] | None = None
        self.masks: dict[str, Path] | None = None
        if boxes is not None:
            boxes = Path(boxes)
            if boxes.is_dir():
                self.voc = {Path(e.name).stem: Path(e.path) for e in os.scandir(boxes) if e.name.lower().endswith(".xml")}
                if not self.voc:
                    raise AnnotationError(f"--boxes {boxes}: no .xml files (Pascal VOC) in it")
            elif boxes.is_file() and boxes.suffix.lower() == ".json":
                self.coco = read_coco(boxes)
            else:
                raise AnnotationError(f"--boxes {boxes}: " + ("does not exist" if not os.path.lexists(boxes) else
                                                              "give a folder of Pascal VOC .xml files or a COCO .json file"))
        if masks is not None:
            masks = Path(masks)
            if not masks.is_dir():
                raise AnnotationError(f"--masks {masks}: " + ("does not exist" if not os.path.lexists(masks) else
                                                              "give a folder of {stem}.png masks"))
            self.masks = {Path(e.name).stem: Path(e.path) for e in os.scandir(masks) if e.name.lower().endswith(".png")}
            if not self.masks:
                raise AnnotationError(f"--masks {masks}: no .png masks in it")

    def boxes_for(self, stem: str) -> ImageBoxes | None:
        """The image's boxes (``None``: no annotation for it); :class:`AnnotationProblem` for a broken file."""
        if self.coco is not None:
            return self.coco.get(stem)
        if self.voc is not None and stem in self.voc:
            return read_voc(self.voc[stem])
        return None

    def mask_for(self, stem: str, height: int, width: int) -> np.ndarray | None:
        """The image's object mask ``(H, W)`` bool (``None``: none); :class:`AnnotationProblem` if it cannot be read
        or does not fit the image."""
        if self.masks is None or stem not in self.masks:
            return None
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(self.masks[stem]) as image:
                pixels = np.asarray(image.convert("L") if image.mode not in ("L", "1", "I", "I;16", "P") else image)
        except (OSError, UnidentifiedImageError) as error:
            raise AnnotationProblem(f"cannot read mask {self.masks[stem].name}: {error}") from None
        if pixels.shape[:2] != (height, width):
            raise AnnotationProblem(f"mask {self.masks[stem].name} is {pixels.shape[1]}×{pixels.shape[0]}, the image "
                                    f"{width}×{height}: it does not fit")
        return pixels.reshape(height, width, -1).any(axis=2)

    def identity(self) -> dict:
        """What the annotations are, for the evaluation's record: the sources as given."""
        return {"boxes": "coco" if self.coco is not None else "voc" if self.voc is not None else None,
                "masks": self.masks is not None}
