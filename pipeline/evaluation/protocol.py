"""What a run evaluates: the split and the Recall@K cut-offs, resolved in one place.

`eval.recall_ks` and `data.test_split` are empty by default, meaning "as the dataset says": the
protocol its metadata.json records (`evaluation`: SOP's Recall@1/10/100/1000, In-Shop's query
split ranked against its gallery), else Recall@1/2/4/8 on the `test` split. A value that is
set is kept as it is, whatever it equals. Training, evaluation of a checkpoint, the run report
and the sweep's metric names all read the resolved values.
"""

from __future__ import annotations

from dataclasses import replace

from pipeline.config import Config
from pipeline.evaluation.metrics import DEFAULT_KS

DEFAULT_TEST_SPLIT = "test"
"""The split evaluated when neither the config nor the dataset names one."""


def resolve_evaluation(config: Config, metadata) -> Config:
    """`config` with `eval.recall_ks` and `data.test_split` filled in where left empty, from
    `metadata` (the dataset's DatasetMetadata). Resolving twice changes nothing."""
    protocol = metadata.evaluation
    recall_ks = config.eval.recall_ks or list(protocol.recall_ks if protocol else DEFAULT_KS)
    test_split = config.data.test_split or (
        (protocol.query_split if protocol else None) or DEFAULT_TEST_SPLIT
    )
    return replace(
        config,
        eval=replace(config.eval, recall_ks=list(recall_ks)),
        data=replace(config.data, test_split=test_split),
    )


def gallery_split(config: Config, metadata) -> str:
    """The split the evaluated queries of a resolved `config` are ranked against, or "" when the
    test split's images are ranked against each other (CUB, Cars196, SOP)."""
    protocol = metadata.evaluation
    if protocol is not None and protocol.query_split and config.data.test_split == protocol.query_split:
        return protocol.gallery_split
    return ""


def planned_recall_ks(config: Config) -> list[int]:
    """The cut-offs a run of `config` will report, known before its dataset is resolved (the
    sweep names its metrics before any trial starts). Reads the dataset's metadata.json only
    when `eval.recall_ks` is left to it; the built-in dataset records no protocol."""
    if config.eval.recall_ks:
        return list(config.eval.recall_ks)
    if not config.data.root:
        return list(DEFAULT_KS)
    from pipeline.data.format import read_metadata

    protocol = read_metadata(config.data.root).evaluation
    return list(protocol.recall_ks if protocol else DEFAULT_KS)
