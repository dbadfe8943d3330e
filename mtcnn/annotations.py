"""Face annotation readers: WIDER, 5-point lists, WebFaces, dlib XML and FDDB into one canonical form.

Every reader returns a list of `ImageAnnotation`, one per image, in file order. Boxes are
x1, y1, x2, y2 in pixels with x2 = x1 + width (the WIDER evaluation's convention); landmarks are
left eye, right eye, nose, left and right mouth corner (image-left first), NaN where a format does
not give a point. A malformed line raises `AnnotationError` naming the file and the 1-based line.
"""

from __future__ import annotations

import math
import os
import xml.sax
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

__all__ = [
    "AnnotationError", "FACE_FORMATS", "FaceSourceError", "ImageAnnotation", "PointBoxRule",
    "WEBFACES_BOX_RULE", "DETECTOR_WINDOW_RULE", "box_from_points", "face_format", "from_table", "read_dlib_xml",
    "read_face_source", "read_facepoint_list", "read_fddb", "read_webfaces", "read_wider",
    "split_format", "to_table",
]

NUM_LANDMARKS = 5


class AnnotationError(ValueError):
    """A malformed annotation file; the message names the file and the 1-based line."""

    def __init__(self, path: str | os.PathLike, line: int | None, problem: str) -> None:
        where = f"{path}, line {line}" if line is not None else str(path)
        super().__init__(f"{where}: {problem}")
        self.path = str(path)
        self.line = line


@dataclass
class ImageAnnotation:
    """The faces annotated in one image."""

    path: str
    boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.float32))
    landmarks: np.ndarray | None = None
    ignore: np.ndarray | None = None
    width: int | None = None
    height: int | None = None

    def __post_init__(self) -> None:
        self.boxes = np.asarray(self.boxes, np.float32).reshape(-1, 4)
        count = len(self.boxes)
        if self.landmarks is None:
            self.landmarks = np.full((count, NUM_LANDMARKS, 2), np.nan, np.float32)
        self.landmarks = np.asarray(self.landmarks, np.float32).reshape(-1, NUM_LANDMARKS, 2)
        if self.ignore is None:
            self.ignore = np.zeros(count, bool)
        self.ignore = np.asarray(self.ignore, bool).reshape(-1)
        if len(self.landmarks) != count or len(self.ignore) != count:
            raise ValueError(f"{self.path}: {count} boxes but {len(self.landmarks)} landmark sets "
                             f"and {len(self.ignore)} ignore flags")

    def __len__(self) -> int:
        return len(self.boxes)


def _is_url(path: str) -> bool:
    """Whether a path is written as a URL (jobs.common.storage.is_url's rule; the library stays apart)."""
    return "://" in path


def _image_root(image_root: str | os.PathLike | None, default: Path) -> Path | str:
    """The folder images are relative to; URLs stay strings (Path would fold "s3://" to "s3:/")."""
    if image_root is None:
        return default
    return str(image_root) if _is_url(str(image_root)) else Path(image_root)


def _resolve(root: Path | str, relative: str) -> str:
    """The image path for a name found in an annotation file (URLs and absolute paths kept)."""
    relative = relative.replace("\\", "/")
    if _is_url(relative) or os.path.isabs(relative):
        return relative
    root_text = str(root)
    if _is_url(root_text):
        return root_text.rstrip("/") + "/" + relative
    return os.path.abspath(os.path.join(root, relative))


def _numbers(path: Path, line_number: int, fields: list[str], what: str) -> list[float]:
    try:
        values = [float(text) for text in fields]
    except ValueError:
        raise AnnotationError(path, line_number, f"expected numbers for {what}, got {' '.join(fields)!r}") from None
    if not all(math.isfinite(value) for value in values):
        raise AnnotationError(path, line_number, f"{what} must be finite numbers, got {' '.join(fields)!r}")
    return values


def _lines(path: Path) -> list[str]:
    """The file's lines without line endings (LF or CRLF)."""
    try:
        with open(path, encoding="utf-8-sig", newline=None) as stream:
            return [line.rstrip("\r\n") for line in stream]
    except FileNotFoundError:
        raise AnnotationError(path, None, "file not found") from None
    except UnicodeDecodeError as error:
        raise AnnotationError(path, None, f"not a UTF-8 text file ({error.reason})") from None


def _group_by_image(entries: list[tuple[str, list[float], list[float]]]) -> list[ImageAnnotation]:
    """One annotation per image from (path, box, landmarks) rows, in order of first appearance."""
    grouped: dict[str, tuple[list, list]] = {}
    for image_path, box, points in entries:
        boxes, landmarks = grouped.setdefault(image_path, ([], []))
        boxes.append(box)
        landmarks.append(points)
    return [ImageAnnotation(image_path, np.array(boxes, np.float32), np.array(landmarks, np.float32))
            for image_path, (boxes, landmarks) in grouped.items()]


# --------------------------------------------------------------------------------------------------
# WIDER FACE


def _is_zero_row(line: str) -> bool:
    fields = line.split()
    try:
        return len(fields) == 10 and not any(float(text) for text in fields)
    except ValueError:
        return False


def _counted_records(path: Path, lines: list[str], field_count: int, field_names: str, what: str,
                     zero_row: bool = False):
    """(name, [(line number, numbers), ...]) of each "name / count / count rows" record."""
    index = 0
    while index < len(lines):
        name = lines[index].strip()
        index += 1
        if not name:
            continue  # blank lines between records carry nothing
        if index >= len(lines):
            raise AnnotationError(path, index, f"image {name!r} has no face count line")
        count_text = lines[index].strip()
        index += 1
        if not count_text.isdigit():
            raise AnnotationError(path, index, f"expected the number of faces of {name!r}, got {count_text!r}")
        count = int(count_text)
        rows = []
        for _ in range(count):
            if index >= len(lines):
                raise AnnotationError(path, index, f"image {name!r} announces {count} faces, "
                                      f"the file ends after {len(rows)}")
            fields = lines[index].split()
            index += 1
            if len(fields) != field_count:
                raise AnnotationError(path, index, f"expected {field_count} fields '{field_names}' "
                                      f"(face {len(rows) + 1} of {count} of {name!r}), got {len(fields)}")
            rows.append((index, _numbers(path, index, fields, what)))
        # WIDER's files follow a count of 0 with one all-zero row; skip it.
        if zero_row and count == 0 and index < len(lines) and _is_zero_row(lines[index]):
            index += 1
        yield name, rows


def read_wider(gt_file: str | os.PathLike, image_root: str | os.PathLike | None = None) -> list[ImageAnnotation]:
    """Faces of a WIDER FACE `*_bbx_gt.txt` file; boxes marked invalid are flagged ignore."""
    path = Path(gt_file)
    root = _image_root(image_root, path.parent / "images")
    lines = _lines(path)
    annotations = []
    for name, rows in _counted_records(path, lines, 10, "x y w h blur expression illumination "
                                       "invalid occlusion pose", "a face row", zero_row=True):
        rows = [values for _, values in rows]
        values = np.array(rows, np.float32).reshape(-1, 10)
        boxes = np.concatenate([values[:, :2], values[:, :2] + values[:, 2:4]], axis=1)
        annotations.append(ImageAnnotation(_resolve(root, name), boxes, ignore=values[:, 7] == 1))
    return annotations


# --------------------------------------------------------------------------------------------------
# Sun et al. 5-point list (CNN_FacePoint / MTFL)


def read_facepoint_list(list_file: str | os.PathLike,
                        image_root: str | os.PathLike | None = None) -> list[ImageAnnotation]:
    """Faces of a 5-point list: `path x1 x2 y1 y2` (note the order) then 5 (x, y) points."""
    path = Path(list_file)
    root = _image_root(image_root, path.parent)
    entries = []
    for line_number, line in enumerate(_lines(path), start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 15:
            raise AnnotationError(path, line_number, f"expected 15 fields 'path x_left x_right y_top y_bottom' "
                                  f"and 5 (x, y) points, got {len(fields)}")
        values = _numbers(path, line_number, fields[1:], "the box and points")
        left, right, top, bottom = values[:4]
        if right < left or bottom < top:
            raise AnnotationError(path, line_number, f"box {left:g} {right:g} {top:g} {bottom:g} is not "
                                  "'x_left x_right y_top y_bottom' (right < left or bottom < top)")
        points = np.array(values[4:], np.float32).reshape(5, 2)
        # Points far outside their box mean the box columns are in another order (x1 y1 x2 y2?).
        margin_x, margin_y = (right - left) / 2, (bottom - top) / 2
        if ((points[:, 0] < left - margin_x) | (points[:, 0] > right + margin_x) |
                (points[:, 1] < top - margin_y) | (points[:, 1] > bottom + margin_y)).any():
            raise AnnotationError(path, line_number, f"landmarks lie far outside the box {left:g} {right:g} "
                                  f"{top:g} {bottom:g}; the box columns must be x_left x_right y_top y_bottom")
        entries.append((_resolve(root, fields[0]), [left, top, right, bottom], points))
    return _group_by_image(entries)


# --------------------------------------------------------------------------------------------------
# Caltech WebFaces: four points, no box


@dataclass(frozen=True)
class PointBoxRule:
    """A square face box from the eyes and mouth centre.

    With E the eye midpoint, M the mouth centre, d_eyes = |right eye - left eye| and
    d_mouth = |M - E|: the box is square, centred at E + centre_along_axis * (M - E), with side
    side_scale * sqrt(d_eyes^2 + d_mouth^2). Combining both distances keeps the size stable
    when the head turns (d_eyes shrinks) or nods (d_mouth shrinks).
    """

    centre_along_axis: float
    side_scale: float


#: Fitted on the 2,015 faces of cnn_facepoint_5pt/trainImageList.txt (medians; mouth centre = mean
#: of the mouth corners) by benchmarks/webfaces_box_rule.py: the derived boxes have median IoU 0.83
#: with the annotated boxes on the train and on the held-out test list, 90% >= 0.7, all >= 0.5.
WEBFACES_BOX_RULE = PointBoxRule(centre_along_axis=0.49, side_scale=1.44)

#: The windows O-Net is handed at detection time: the reference cascade's squared R-Net windows on
#: the 2,013 faces of cnn_facepoint_5pt/trainImageList.txt it finds (medians, benchmarks/
#: webfaces_box_rule.py). They are about 1.26x the annotated boxes' side and centred higher (0.36 of
#: the way from the eyes to the mouth, not 0.49); median IoU 0.81 with those windows on the test list.
DETECTOR_WINDOW_RULE = PointBoxRule(centre_along_axis=0.363, side_scale=1.815)


def box_from_points(left_eye: np.ndarray, right_eye: np.ndarray, mouth_centre: np.ndarray,
                    rule: PointBoxRule = WEBFACES_BOX_RULE) -> np.ndarray:
    """Boxes (N, 4) x1 y1 x2 y2 derived from (N, 2) eye and mouth-centre points by `rule`."""
    left_eye, right_eye, mouth_centre = (np.asarray(p, np.float64).reshape(-1, 2)
                                         for p in (left_eye, right_eye, mouth_centre))
    eye_mid = (left_eye + right_eye) / 2
    eye_distance = np.linalg.norm(right_eye - left_eye, axis=1)
    mouth_distance = np.linalg.norm(mouth_centre - eye_mid, axis=1)
    centre = eye_mid + rule.centre_along_axis * (mouth_centre - eye_mid)
    half = rule.side_scale * np.hypot(eye_distance, mouth_distance)[:, None] / 2
    return np.concatenate([centre - half, centre + half], axis=1).astype(np.float32)


def read_webfaces(gt_file: str | os.PathLike, image_root: str | os.PathLike | None = None,
                  box_rule: PointBoxRule = WEBFACES_BOX_RULE) -> list[ImageAnnotation]:
    """Faces of a Caltech WebFaces ground-truth file; boxes derived from the points by `box_rule`.

    Eyes and nose become landmarks; the mouth corners stay NaN, since the mouth centre is not a corner.
    """
    path = Path(gt_file)
    root = _image_root(image_root, path.parent / "images")
    entries = []
    for line_number, line in enumerate(_lines(path), start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 9:
            raise AnnotationError(path, line_number, "expected 9 fields 'image left_eye_x left_eye_y right_eye_x "
                                  f"right_eye_y nose_x nose_y mouth_x mouth_y', got {len(fields)}")
        points = np.array(_numbers(path, line_number, fields[1:], "the points"), np.float32).reshape(4, 2)
        box = box_from_points(points[0], points[1], points[3], box_rule)[0]
        landmarks = np.full((5, 2), np.nan, np.float32)
        landmarks[:3] = points[:3]
        entries.append((_resolve(root, fields[0]), box, landmarks))
    return _group_by_image(entries)


# --------------------------------------------------------------------------------------------------
# dlib imglab XML

# iBUG 300-W 68-point indices -> our five points (the scheme numbers points image-left first).
_IBUG_LEFT_EYE = [f"{i:02d}" for i in range(36, 42)]
_IBUG_RIGHT_EYE = [f"{i:02d}" for i in range(42, 48)]
_IBUG_SINGLE = {2: "30", 3: "48", 4: "54"}  # nose tip, left and right mouth corner


class _DlibHandler(xml.sax.handler.ContentHandler):
    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = path
        self.images: list[ImageAnnotation] = []
        self._image: dict | None = None
        self._box: dict | None = None

    def _line(self) -> int | None:
        return self._locator.getLineNumber() if getattr(self, "_locator", None) else None

    def _integer(self, attributes, name: str, element: str, required: bool = True) -> int | None:
        if name not in attributes:
            if required:
                raise AnnotationError(self.path, self._line(), f"<{element}> lacks the attribute {name!r}")
            return None
        try:
            return int(float(attributes[name]))
        except ValueError:
            raise AnnotationError(self.path, self._line(), f"<{element}> attribute {name}="
                                  f"{attributes[name]!r} is not a number") from None

    def startElement(self, name, attributes):  # noqa: N802 (SAX API)
        if name == "image":
            if "file" not in attributes:
                raise AnnotationError(self.path, self._line(), "<image> lacks the attribute 'file'")
            self._image = {"file": attributes["file"], "boxes": [], "landmarks": [], "ignore": [],
                           "width": self._integer(attributes, "width", "image", required=False),
                           "height": self._integer(attributes, "height", "image", required=False)}
        elif name == "box":
            if self._image is None:
                raise AnnotationError(self.path, self._line(), "<box> outside an <image>")
            left, top, width, height = (self._integer(attributes, key, "box") for key in
                                        ("left", "top", "width", "height"))
            if width < 0 or height < 0:
                raise AnnotationError(self.path, self._line(), f"<box> has a negative size {width} x {height}")
            self._box = {"box": [left, top, left + width, top + height], "parts": {},
                         "ignore": attributes.get("ignore", "0").strip() in ("1", "true")}
        elif name == "part":
            if self._box is None:
                raise AnnotationError(self.path, self._line(), "<part> outside a <box>")
            part_name = attributes.get("name")
            if part_name is None:
                raise AnnotationError(self.path, self._line(), "<part> lacks the attribute 'name'")
            self._box["parts"][part_name] = (self._integer(attributes, "x", "part"),
                                             self._integer(attributes, "y", "part"))

    def endElement(self, name):  # noqa: N802 (SAX API)
        if name == "box" and self._box is not None:
            self._image["boxes"].append(self._box["box"])
            self._image["landmarks"].append(_five_from_ibug(self._box["parts"]))
            self._image["ignore"].append(self._box["ignore"])
            self._box = None
        elif name == "image" and self._image is not None:
            image = self._image
            self.images.append(ImageAnnotation(
                _resolve(self.path.parent, image["file"]), np.array(image["boxes"], np.float32),
                np.array(image["landmarks"], np.float32).reshape(-1, 5, 2), np.array(image["ignore"], bool),
                image["width"], image["height"]))
            self._image = None


def _five_from_ibug(parts: dict[str, tuple[int, int]]) -> np.ndarray:
    """The five canonical points from iBUG 68-point parts; NaN for any that are missing."""
    five = np.full((5, 2), np.nan, np.float32)
    for slot, names in ((0, _IBUG_LEFT_EYE), (1, _IBUG_RIGHT_EYE)):
        if all(n in parts for n in names):
            five[slot] = np.mean([parts[n] for n in names], axis=0)
    for slot, part_name in _IBUG_SINGLE.items():
        if part_name in parts:
            five[slot] = parts[part_name]
    return five


def read_dlib_xml(xml_file: str | os.PathLike) -> list[ImageAnnotation]:
    """Faces of a dlib imglab XML file; 68-point parts give the five landmarks, ignore='1' flags ignore."""
    path = Path(xml_file)
    if not path.is_file():
        raise AnnotationError(path, None, "file not found")
    handler = _DlibHandler(path)
    parser = xml.sax.make_parser()
    # Never fetch external entities or DTDs named by the file.
    parser.setFeature(xml.sax.handler.feature_external_ges, False)
    parser.setFeature(xml.sax.handler.feature_external_pes, False)
    parser.setContentHandler(handler)
    try:
        parser.parse(str(path))
    except xml.sax.SAXParseException as error:
        raise AnnotationError(path, error.getLineNumber(), f"not well-formed XML: {error.getMessage()}") from None
    return handler.images


# --------------------------------------------------------------------------------------------------
# FDDB ellipse lists


def read_fddb(ellipse_file: str | os.PathLike, image_root: str | os.PathLike | None = None,
              extension: str = ".jpg") -> list[ImageAnnotation]:
    """Faces of an FDDB `*-ellipseList.txt`; each ellipse becomes its axis-aligned bounding box."""
    path = Path(ellipse_file)
    root = _image_root(image_root, path.parent)
    lines = _lines(path)
    annotations = []
    for name, rows in _counted_records(path, lines, 6, "major_axis_radius minor_axis_radius "
                                       "angle center_x center_y 1", "an ellipse"):
        boxes = []
        for index, (major, minor, angle, centre_x, centre_y, _) in rows:
            if major < 0 or minor < 0:
                raise AnnotationError(path, index, f"ellipse radii must not be negative, got {major:g}, {minor:g}")
            # Half extents of a rotated ellipse along x and y.
            half_width = math.sqrt((major * math.cos(angle)) ** 2 + (minor * math.sin(angle)) ** 2)
            half_height = math.sqrt((major * math.sin(angle)) ** 2 + (minor * math.cos(angle)) ** 2)
            boxes.append([centre_x - half_width, centre_y - half_height,
                          centre_x + half_width, centre_y + half_height])
        annotations.append(ImageAnnotation(_resolve(root, name + extension), np.array(boxes, np.float32)))
    return annotations


# --------------------------------------------------------------------------------------------------
# Arrow table form

TABLE_SCHEMA = pa.schema([
    ("path", pa.string()),
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("boxes", pa.list_(pa.list_(pa.float32(), 4))),
    ("landmarks", pa.list_(pa.list_(pa.float32(), 10))),  # x, y of the five points in turn
    ("ignore", pa.list_(pa.bool_())),
])


def to_table(annotations: list[ImageAnnotation]) -> pa.Table:
    """A pyarrow Table with one row per image (schema `TABLE_SCHEMA`)."""
    def nested(arrays: list[np.ndarray], width: int) -> pa.Array:
        counts = np.array([len(a) for a in arrays], np.int32)
        offsets = pa.array(np.concatenate([[0], np.cumsum(counts)]).astype(np.int32))
        flat = np.concatenate([a.reshape(-1) for a in arrays]) if arrays else np.zeros(0, np.float32)
        rows = pa.FixedSizeListArray.from_arrays(pa.array(flat.astype(np.float32)), width)
        return pa.ListArray.from_arrays(offsets, rows)

    return pa.table({
        "path": pa.array([a.path for a in annotations], pa.string()),
        "width": pa.array([a.width for a in annotations], pa.int32()),
        "height": pa.array([a.height for a in annotations], pa.int32()),
        "boxes": nested([a.boxes for a in annotations], 4),
        "landmarks": nested([a.landmarks for a in annotations], 10),
        "ignore": pa.array([a.ignore.tolist() for a in annotations], pa.list_(pa.bool_())),
    }, schema=TABLE_SCHEMA)


def from_table(table: pa.Table) -> list[ImageAnnotation]:
    """The annotations of a table written by `to_table` (or read back from its Parquet)."""
    missing = [name for name in TABLE_SCHEMA.names if name not in table.column_names]
    if missing:
        raise ValueError(f"annotation table lacks the columns {missing}; it has {table.column_names}")
    table = table.select(TABLE_SCHEMA.names).cast(TABLE_SCHEMA)

    def unnest(column: pa.ChunkedArray, width: int) -> list[np.ndarray]:
        array = column.combine_chunks()
        offsets = array.offsets.to_numpy()
        flat = array.values.flatten().to_numpy(zero_copy_only=False).astype(np.float32)
        flat = flat.reshape(-1, width)
        # `values` ignores a slice of the list array but `offsets` index into it, so they agree.
        return [flat[offsets[i]:offsets[i + 1]] for i in range(len(array))]

    boxes = unnest(table["boxes"], 4)
    landmarks = unnest(table["landmarks"], 10)
    ignore = table["ignore"].to_pylist()
    return [ImageAnnotation(path, boxes[i], landmarks[i].reshape(-1, 5, 2), np.array(ignore[i] or [], bool),
                            width, height)
            for i, (path, width, height) in enumerate(zip(table["path"].to_pylist(), table["width"].to_pylist(),
                                                          table["height"].to_pylist()))]


# -- face sources: which reader a file needs ---------------------------------------------------

#: Face annotation formats a source may name as FORMAT:PATH, each read by its reader above.
FACE_FORMATS = ("wider", "webfaces", "dlib", "fddb", "table")


class FaceSourceError(AnnotationError):
    """A face source whose format cannot be told or whose file is not there (not a bad line)."""

    def __init__(self, source: str, problem: str) -> None:
        super().__init__(source, None, problem)


def split_format(source: str) -> tuple[str | None, str]:
    """(FORMAT, PATH) of a FORMAT:PATH source; (None, source) when it names no known format."""
    head, colon, rest = str(source).partition(":")
    if colon and head.lower() in FACE_FORMATS:
        return head.lower(), rest
    return None, str(source)


def face_format(source: str) -> tuple[str, str]:
    """(format, path) of a face source: FORMAT:PATH, or a path whose name tells the format."""
    named, path_text = split_format(source)
    if named is not None:
        return named, path_text
    path = Path(source)
    name = path.name.lower()
    if path.is_dir() or name.endswith("_bbx_gt.txt"):
        return "wider", source
    if name.endswith(".xml"):
        return "dlib", source
    if name.endswith(".parquet"):
        return "table", source
    if "ellipselist" in name:
        return "fddb", source
    if "webfaces" in name or "groundthruth" in name:
        return "webfaces", source
    raise FaceSourceError(source, "cannot tell the annotation format from the name; write it as "
                                  f"FORMAT:PATH, FORMAT one of {', '.join(FACE_FORMATS)}")


def _wider_paths(source: str, images: str | None) -> tuple[str, str]:
    """The gt file and image root of a WIDER source given as a file or a folder."""
    path = Path(source)
    if path.is_dir():
        found = sorted(path.glob("*_bbx_gt.txt"))
        if len(found) != 1:
            raise FaceSourceError(source, f"is a folder; expected exactly one *_bbx_gt.txt in it, found "
                                          f"{len(found)}: pass the gt file itself")
        return str(found[0]), images or str(path / "images")
    if not path.is_file():
        raise FaceSourceError(source, "no such file or folder")
    return str(path), images or str(path.parent / "images")


def read_face_source(source: str, images: str | os.PathLike | None = None) -> list[ImageAnnotation]:
    """The face annotations of one source (FORMAT:PATH or a telling name), read by its format's reader."""
    kind, path = face_format(source)
    if _is_url(path):
        raise FaceSourceError(source, "annotation files are read from local disk (the images they name "
                                      "may be anywhere); copy the file here and pass its path")
    if kind == "wider":
        return read_wider(*_wider_paths(path, images))
    if not Path(path).is_file():
        raise FaceSourceError(source, "no such file")
    if kind == "webfaces":
        return read_webfaces(path, images)
    if kind == "dlib":
        return read_dlib_xml(path)
    if kind == "fddb":
        return read_fddb(path, images)
    import pyarrow.parquet as pq

    return from_table(pq.read_table(path))
