"""Export embeddings and a faiss index:
`python -m jobs.export_embeddings <checkpoint> <dataset root> <out dir> [--split test]`.

Embeds every image of the split with Ray Data (one model per GPU, or on CPUs), writes them as
Parquet (id, label, embedding) and builds a faiss index over them, saved beside. Local paths
or s3://; on a multi-node cluster give an s3:// checkpoint or run storage.
"""

from __future__ import annotations

import argparse
import sys

from pipeline.serving import add_device_flag


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "checkpoint",
        help="a checkpoint directory, a run directory, or a run name "
        "under --storage-path (its latest checkpoint)",
    )
    parser.add_argument("dataset_root", help="dataset root in the project's format (path or s3://)")
    parser.add_argument("out_dir", help="new or empty output directory (path or s3://)")
    parser.add_argument("--split", default="test", help="split to embed (default: test)")
    parser.add_argument("--storage-path", default="runs", help="where run names are looked up")
    parser.add_argument(
        "--index",
        dest="index_description",
        default="Flat",
        help="faiss index_factory description: Flat (exact, default), IVF1024,Flat, HNSW32, ...",
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=0,
        help="images per inference batch (default: eval.batch_size)",
    )
    parser.add_argument(
        "--actors", type=int, default=0, help="embedding actors (default: one per GPU, or one)"
    )
    parser.add_argument(
        "--cpus", type=int, default=0,
        help="on a cluster, CPUs of the task that builds the index and writes an s3:// export "
        "(default: those free once the images are embedded, on the node with most free)",
    )
    add_device_flag(parser)
    parser.add_argument(
        "--verbose", action="store_true", help="show Ray's own logs and progress bars"
    )
    args = parser.parse_args(argv)

    from pipeline.serving.export import export_embeddings
    from pipeline.storage import check_location

    try:
        locations = {"checkpoint": args.checkpoint, "dataset_root": args.dataset_root,
                     "out_dir": args.out_dir, "--storage-path": args.storage_path}
        for where, location in locations.items():  # a mistyped URI would be a local folder
            check_location(location, where)
        summary = export_embeddings(
            args.checkpoint,
            args.dataset_root,
            args.out_dir,
            split=args.split,
            storage_path=args.storage_path,
            index_description=args.index_description,
            batch_size=args.batch_size,
            actors=args.actors,
            device=args.device,
            cpus=args.cpus,
            verbose=args.verbose,
        )
    except (ValueError, FileExistsError) as err:  # bad input, named in the message
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"export in {summary.export_dir}: {summary.num_embeddings} embeddings")
    print(f"faiss index: {summary.index_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
