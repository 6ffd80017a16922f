"""Convert a benchmark in its released layout into the project's format:
`python -m jobs.prepare_data <layout> <source dir> <destination root> [options]`."""

from __future__ import annotations

import argparse
import sys

from pipeline.data.convert import (
    LAYOUTS,
    ConversionOptions,
    EncodeOptions,
    SourceLayoutError,
    convert_dataset,
    describe_summary,
)
from pipeline.storage import check_location


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("layout", choices=list(LAYOUTS), help="the source's released layout")
    parser.add_argument("source", help="the unpacked release (local path or URI)")
    parser.add_argument("destination", help="dataset root to write (local path or s3://...)")
    parser.add_argument("--short-side", type=int, default=256,
                        help="resize so the shorter side has this many pixels; 0 keeps the size")
    parser.add_argument("--jpeg-quality", type=int, default=95, help="JPEG quality 1-95")
    parser.add_argument("--shard-size", type=int, default=ConversionOptions.shard_size,
                        help="images per Parquet shard")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a dataset already at the destination")
    parser.add_argument("--test-fraction", type=float, default=0.5,
                        help="folders: fraction of the class folders held out as the test split")
    parser.add_argument("--seed", type=int, default=0, help="folders: seed of the class split")
    parser.add_argument("--cpus-per-task", type=float, default=0.5,
                        help="CPUs each Ray encoding task reserves")
    args = parser.parse_args(argv)
    try:
        for where in ("source", "destination"):  # a mistyped URI would be a local folder
            check_location(getattr(args, where), where)
        options = ConversionOptions(
            encode=EncodeOptions(short_side=args.short_side, jpeg_quality=args.jpeg_quality),
            shard_size=args.shard_size,
            overwrite=args.overwrite,
            test_fraction=args.test_fraction,
            seed=args.seed,
            cpus_per_task=args.cpus_per_task,
        )
        summary = convert_dataset(args.layout, args.source, args.destination, options)
    except (SourceLayoutError, FileExistsError, ValueError) as err:
        print(f"prepare_data: {err}", file=sys.stderr)
        return 2
    print("\n".join(describe_summary(summary)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
