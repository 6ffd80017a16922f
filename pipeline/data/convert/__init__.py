"""Converters from the field's benchmarks (CUB-200-2011, Cars196, Stanford Online Products,
In-Shop Clothes) and plain class folders, in their released layouts, into the project's format.

One module per layout parses that release's metadata into a `ConversionPlan` (no Ray);
`writer.convert_dataset` encodes the images in Ray tasks and writes the dataset with
`pipeline.data.format.write_dataset`. See docs/datasets.md.
"""

from pipeline.data.convert.encoding import EncodeOptions
from pipeline.data.convert.source import ConversionPlan, SourceLayoutError
from pipeline.data.convert.writer import (
    LAYOUTS,
    SUMMARY_FILE,
    ConversionOptions,
    check_destination,
    convert_dataset,
    describe_summary,
    read_plan,
)

__all__ = [
    "LAYOUTS",
    "SUMMARY_FILE",
    "ConversionOptions",
    "ConversionPlan",
    "EncodeOptions",
    "SourceLayoutError",
    "check_destination",
    "convert_dataset",
    "describe_summary",
    "read_plan",
]
