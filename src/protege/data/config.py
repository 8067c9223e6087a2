"""The data section of a recipe: where the examples come from and how they are split."""
from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, field_validator

from ..config import PathStr, _Strict
from .decode import known_encoding


class DataConfig(_Strict):
    """Where the examples come from and how they are split."""

    source: Literal["digits", "fashion_mnist", "csv", "arrays", "images", "hf_dataset", "text", "lm_text"] = "digits"
    path: Optional[PathStr] = None  # csv, arrays .npy/.npz, images folder or manifest, text .csv/.jsonl, Fashion-MNIST folder
    labels: Optional[PathStr] = None  # arrays: a .npy of one label per example, when path is a .npy of inputs
    target: Optional[str] = None  # csv / text: the label column (text default: label)
    text: str = "text"  # text: the column holding the text
    test_path: Optional[PathStr] = None  # text / lm_text: a separate test file (default: a test_fraction split of `path`)
    tokenizer: Optional[PathStr] = None  # text: a Hugging Face folder with the tokenizer (default: the teacher's folder)
    max_length: int = Field(128, ge=2, le=1_000_000)  # text: tokens per example at most
    too_long: Literal["truncate", "error"] = "truncate"  # text: cut longer examples (with a warning) or refuse them
    block_size: int = Field(128, ge=2, le=1_000_000)  # lm_text: tokens per training sequence (documents are joined, then cut)
    eval_limit: Optional[int] = Field(None, ge=1)  # lm_text: at most this many validation and test blocks (a seeded subset)
    categorical: Optional[list[str]] = None  # csv: columns to one-hot encode (default: inferred)
    numeric: Optional[list[str]] = None  # csv: columns that must be numbers (default: inferred)
    columns: Optional[list[str]] = None  # csv: the feature columns, in this order (default: every column but the target)
    drop: list[str] = Field(default_factory=list)  # csv: columns to leave out (an ID column, one the teacher never saw)
    scaling: Literal["standardize", "minmax", "none"] = "standardize"  # csv: per numeric column; arrays, images: over all values
    missing: Literal["error", "mean"] = "error"  # csv: an empty (or NaN) numeric cell is an error, or filled with the training mean
    shape: Optional[list[int]] = None  # csv / arrays: each example reshaped to this (a pixel table: [1, 28, 28])
    image: Optional[str] = None  # hf_dataset: the image column (default: the dataset's one Image column)
    channels: Optional[Literal[1, 3]] = None  # images: grayscale or RGB (default: as the first image)
    image_size: Optional[list[int]] = None  # images: [height, width] every image is resized to (default: all one size already)
    skip_bad_files: bool = False  # images: skip unreadable files (counted in the log and the report) instead of stopping
    classes: Optional[list[str]] = Field(None, min_length=2)  # images, arrays, hf_dataset: the class names in the order of
    # the model's outputs (a pretrained teacher's order); default: the labels found, sorted (numbers numerically)
    stream: Optional[bool] = None  # arrays, images: read examples on demand from a memory-mapped file (default: when
    # they would fill more than a quarter of this machine's memory as float32); false: hold them in memory
    workers: Optional[int] = Field(None, ge=0, le=64)  # streamed data: DataLoader worker processes (default 0: see README)
    val_fraction: float = Field(0.1, gt=0, lt=1)
    test_fraction: float = Field(0.2, gt=0, lt=1)  # ignored for fashion_mnist (own test set)
    encoding: str = "utf-8"  # csv / text / lm_text: the files' text encoding (latin-1, cp1252, ...)
    limit: Optional[int] = Field(None, ge=10)  # use at most this many training examples (quick runs)
    split_seed: Optional[int] = Field(None, ge=0, le=2**32 - 1)  # the seed of the train/val/test split (default: the
    # recipe's seed); the seeds of one `--seeds` run share the first seed's split, so the teacher never sees their test data

    @field_validator("encoding")
    @classmethod
    def _known_encoding(cls, name: str) -> str:
        return known_encoding(name)

    @field_validator("classes")
    @classmethod
    def _distinct(cls, classes: Optional[list[str]]) -> Optional[list[str]]:
        if classes is not None and len(set(classes)) != len(classes):
            twice = next(c for c in classes if classes.count(c) > 1)
            raise ValueError(f"classes lists {twice!r} twice; name each class once, in the order of the model's outputs")
        return classes

    @field_validator("image_size")
    @classmethod
    def _two_sizes(cls, size: Optional[list[int]]) -> Optional[list[int]]:
        if size is not None and (len(size) != 2 or not all(1 <= n <= 8192 for n in size)):
            raise ValueError(f"image_size {size} must be [height, width], each 1 to 8192")
        return size

    @field_validator("shape")
    @classmethod
    def _positive_shape(cls, shape: Optional[list[int]]) -> Optional[list[int]]:
        if shape is not None and (not 1 <= len(shape) <= 4 or any(n < 1 for n in shape)):
            raise ValueError(f"shape {shape} must be 1 to 4 positive sizes (a pixel table of 28x28 grayscale images: [1, 28, 28])")
        return shape
