"""The contract of a sample's members: every KEY.json has the same keys with the same types in every source.

Readers that infer types from the data (HF `datasets`, pyarrow, Ray Data) see one table across sources only if
no value is null in one file and typed in another: absent values are typed empty values (`""`, `0`, `-1`, `[]`),
and the source's own raw record (`meta`, a different shape per source) is one JSON-encoded string.
`SAMPLE_SCHEMA` is the whole sample as HF `datasets` reads a tar (one column per member); the dataset card
declares it, so unimodal and paired sources load together.
"""

from __future__ import annotations

import pyarrow as pa

from shards.layout import CLASS_EXT, IMAGE_EXT, JSON_EXT, TEXT_EXT, TOKEN_GRID, TOKENS_EXT

NO_CLASS = -1  # `cls` of a sample without a class label (every source but ImageNet-style folders)

# KEY.json: field -> type, with what an absent value is.
JSON_FIELDS: dict[str, pa.DataType] = {
    "key": pa.string(),  # the sample key (the tar members' KEY)
    "source": pa.string(),  # the source's name, as in the config and the folder
    "captions": pa.list_(pa.string()),  # every kept caption, the first is KEY.txt; [] for image-only samples
    "caption_fields": pa.list_(pa.string()),  # the raw field each caption came from
    "url": pa.string(),  # the image URL; "" for images read from local files or archives, and for text
    "image_path": pa.string(),  # "archive.zip::member" (the archive's file name) or a file name; "" for URLs
    "crop_box": pa.list_(pa.int64()),  # [left, top, right, bottom] of the original used; the whole image if uncropped
    "license": pa.string(),
    "original_width": pa.int64(),  # of the region before resizing; 0 without an image
    "original_height": pa.int64(),
    "width": pa.int64(),  # of the stored KEY.jpg; 0 without an image
    "height": pa.int64(),
    "label": pa.string(),  # the class name (ImageNet's wnid folder); "" when the source has no classes
    "cls": pa.int64(),  # the class index, also KEY.cls; NO_CLASS when the source has no classes
    "meta": pa.string(),  # the source's raw record, JSON-encoded (its shape differs per source); "{}" when none
}
JSON_SCHEMA = pa.struct([pa.field(name, type_) for name, type_ in JSON_FIELDS.items()])

# A sample as one row: the tar members (absent ones null) and webdataset's __key__ / __url__.
SAMPLE_SCHEMA = pa.schema(
    [
        pa.field(IMAGE_EXT, pa.binary()),  # 224x224 JPEG; null for text-only samples
        pa.field(TEXT_EXT, pa.string()),  # the first caption; null for image-only samples
        pa.field(JSON_EXT, JSON_SCHEMA),
        pa.field(CLASS_EXT, pa.int64()),  # null unless the sample has a class
        pa.field(TOKENS_EXT, pa.list_(pa.list_(pa.uint16(), TOKEN_GRID[1]), TOKEN_GRID[0])),  # null until tokenized
        pa.field("__key__", pa.string()),
        pa.field("__url__", pa.string()),
    ]
)

_PYTHON_TYPES = {pa.string(): str, pa.int64(): int}


def json_problems(doc: dict) -> list[str]:
    """How a KEY.json departs from the contract: missing or extra keys, values of another type."""
    problems = [f"missing key {k!r}" for k in JSON_FIELDS if k not in doc]
    problems += [f"unexpected key {k!r}" for k in doc if k not in JSON_FIELDS]
    for name, type_ in JSON_FIELDS.items():
        if name in doc and not _has_type(doc[name], type_):
            problems.append(f"{name} = {doc[name]!r:.60} is not {type_}")
    return problems


def _has_type(value, type_: pa.DataType) -> bool:
    if pa.types.is_list(type_):
        return isinstance(value, list) and all(_has_type(v, type_.value_type) for v in value)
    wanted = _PYTHON_TYPES[type_]
    return isinstance(value, wanted) and not (wanted is int and isinstance(value, bool))


def hf_features(schema: pa.Schema = SAMPLE_SCHEMA) -> list[dict]:
    """The schema in the `features:` form of a Hugging Face dataset card (KEY.jpg as an Image)."""
    return [_hf_feature(field.name, field.type, image=field.name == IMAGE_EXT) for field in schema]


def _hf_feature(name: str, type_: pa.DataType, image: bool = False) -> dict:
    return {"name": name, **_hf_type(type_, image)}


def _hf_type(type_: pa.DataType, image: bool = False) -> dict:
    if image:
        return {"dtype": "image"}
    if pa.types.is_struct(type_):
        return {"struct": [_hf_feature(f.name, f.type) for f in type_]}
    if pa.types.is_list(type_) or pa.types.is_fixed_size_list(type_):
        inner = _hf_type(type_.value_type)
        length = {"length": type_.list_size} if pa.types.is_fixed_size_list(type_) else {}
        return {"list": inner.get("dtype", inner), **length}
    return {"dtype": str(type_)}
