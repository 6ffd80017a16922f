"""The settings tree: one dataclass per concern, each field documented where it is declared.

Precedence is CLI (`--set a.b=c`) > preset/YAML file > the defaults below. `Config.validate`
holds every cross-field rule, so a bad combination stops with one message before Ray starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


def setting(default, doc: str):
    """A dataclass field with a default and a one-line description (shown by `--help-config`)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"doc": doc})
    return field(default=default, metadata={"doc": doc})


def section(cls, doc: str):
    """A nested settings section."""
    return field(default_factory=cls, metadata={"doc": doc})


@dataclass
class SyntheticDataConfig:
    """The built-in generated dataset, used when `data.root` is empty."""

    num_classes: int = setting(128, "Classes in total (half train, half test).")
    modes_per_class: int = setting(3, "Distinct visual modes per class; 1 is the unimodal control.")
    images_per_class: int = setting(60, "Images generated per class.")
    image_size: int = setting(64, "Side of the generated square images, in pixels.")
    test_fraction: float = setting(0.5, "Fraction of classes held out as the (unseen) test split.")
    seed: int = setting(0, "Seed of the generator; the same seed gives the same bytes.")


@dataclass
class DataConfig:
    """Where images come from and how they are turned into tensors."""

    root: str = setting("", "Dataset root (local path or s3://) in the project's format; empty = built-in.")
    cache_dir: str = setting("data", "Where the built-in dataset is generated (reused when it exists).")
    synthetic: SyntheticDataConfig = section(SyntheticDataConfig, "The built-in dataset.")
    train_split: str = setting("train", "Split trained on.")
    test_split: str = setting(
        "",
        "Split evaluated on (classes unseen in training); empty = the dataset's protocol "
        "(In-Shop: 'query', ranked against 'gallery'), else 'test'.",
    )
    image_size: int = setting(48, "Side of the crop fed to the model.")
    eval_resize: int = setting(56, "Evaluation: resize the short side to this, then center-crop image_size.")
    crop_scale_min: float = setting(0.35, "Training RandomResizedCrop: smallest area fraction.")
    seen_holdout_fraction: float = setting(
        0.0,
        "Fraction of each training class held out of training, for the seen-class accuracy "
        "(kNN for every loss, and Magnet's soft nearest-cluster vote).",
    )
    decode_actors: int = setting(1, "Ray Data actors that plan, fetch and decode training batches.")
    decode_cpus: float = setting(0.5, "CPUs reserved by each decode actor.")
    prefetch_batches: int = setting(4, "Batches each rank keeps decoded ahead of the step.")


@dataclass
class SamplerConfig:
    """How each rank's sub-batch is planned (a list of example ids chosen by label)."""

    name: Literal["m_per_class", "shuffle", "neighbourhoods", "hard_pools"] = setting(
        "m_per_class",
        "m_per_class: P classes x M examples per sub-batch; shuffle: plain epochs; "
        "neighbourhoods: Magnet's (set in loss.magnet); hard_pools: P x M plus draws from each "
        "class's hard-negative pool, refreshed by the refresh actor (PDDM's).",
    )
    classes_per_batch: int = setting(8, "P: classes in each rank's sub-batch (m_per_class, hard_pools).")
    samples_per_class: int = setting(4, "M: examples per class in a sub-batch (m_per_class, hard_pools).")
    batch_size: int = setting(32, "Examples per rank's sub-batch (shuffle).")
    pool_size: int = setting(
        32, "Hard-negative pool of each class: its nearest other-class examples over the full set (hard_pools)."
    )
    pool_draws_per_class: int = setting(2, "Examples drawn from each batch class's pool (hard_pools).")


@dataclass
class ModelConfig:
    """The embedding network: a backbone and a linear, L2-normalised head."""

    backbone: Literal["tiny_cnn", "resnet18", "resnet34", "resnet50"] = setting(
        "tiny_cnn", "Backbone; tiny_cnn is a small CNN for CPU runs and tests."
    )
    embedding_dim: int = setting(64, "Output embedding size.")
    normalize: bool = setting(True, "L2-normalise the embedding.")
    pretrained: str = setting("", "Backbone weights (state_dict) from a local path or URI; empty = random init.")
    channels_last: bool = setting(True, "Use channels_last memory format on GPU.")


@dataclass
class TripletSettings:
    """Triplet loss with margin on normalised embeddings."""

    margin: float = setting(0.2, "Margin between positive and negative distances.")
    mining: Literal["batch_hard", "semi_hard", "all"] = setting(
        "semi_hard", "Triplet mining in the global batch (batch_hard tends to collapse from scratch)."
    )


@dataclass
class NormalizedSoftmaxSettings:
    """Normalised softmax (one proxy per class)."""

    temperature: float = setting(0.05, "Softmax temperature over cosine logits.")
    margin: float = setting(0.0, "Additive margin on the true-class cosine.")


@dataclass
class ContrastiveSettings:
    """Contrastive loss on pair distances."""

    pos_margin: float = setting(0.0, "Positive pairs are pulled below this distance.")
    neg_margin: float = setting(0.5, "Negative pairs are pushed beyond this distance.")


@dataclass
class MultiSimilaritySettings:
    """Multi-similarity loss (Wang et al. 2019)."""

    alpha: float = setting(2.0, "Weight of positive similarities.")
    beta: float = setting(50.0, "Weight of negative similarities.")
    base: float = setting(0.5, "Similarity offset lambda.")
    epsilon: float = setting(0.1, "Pair-mining margin.")


@dataclass
class ProxyAnchorSettings:
    """Proxy-anchor loss (Kim et al. 2020)."""

    margin: float = setting(0.1, "Margin delta on proxy similarities.")
    alpha: float = setting(32.0, "Scale alpha.")


@dataclass
class SoftTripleSettings:
    """SoftTriple (Qian et al. 2019): K centers per class; defaults from the paper."""

    centers_per_class: int = setting(10, "K: centers per class.")
    la: float = setting(20.0, "lambda: scale of the logits (about 10 if training diverges).")
    gamma: float = setting(0.1, "gamma: temperature of the softmax over a class's centers.")
    tau: float = setting(0.2, "tau: weight of the center regulariser.")
    margin: float = setting(0.01, "delta: margin on the true class.")


@dataclass
class PDDMSettings:
    """PDDM (Huang et al. 2016): learned pair similarity, hard quadruplets, double-header hinge."""

    hidden_dim: int = setting(128, "Width of the PDDM unit's layers.")
    alpha: float = setting(0.5, "Margin of the metric (score) hinge.")
    beta: float = setting(1.0, "Margin of the embedding (distance) hinge.")
    lam: float = setting(0.5, "lambda: weight of the embedding loss.")
    quadruplets: Literal["hardest", "per_positive_pair"] = setting(
        "hardest", "One quadruplet per batch (the paper) or one per positive pair."
    )
    negatives: Literal["hardest", "semi_hard"] = setting(
        "hardest",
        "Negatives of a pair: highest score (the paper) or highest score below the pair's (semi_hard).",
    )


@dataclass
class MagnetSettings:
    """Magnet loss (Rippel et al. 2016): cluster index, neighbourhood batches, soft-cluster inference."""

    alpha: float = setting(1.0, "Margin between the own-cluster and other-class terms.")
    clusters_per_class: int = setting(8, "K: k-means clusters per class in the index (fewer for small classes).")
    clusters_per_neighbourhood: int = setting(12, "M: clusters per neighbourhood (the seed and its M-1 impostors).")
    examples_per_cluster: int = setting(4, "D: examples drawn from each cluster of a neighbourhood.")
    neighbourhoods_per_rank: int = setting(1, "Neighbourhoods in each rank's sub-batch.")
    nearest_clusters: int = setting(128, "L: nearest centroids voting at inference.")
    sigma2_momentum: float = setting(0.9, "Weight of the old value in the running sigma2 used at inference.")
    seed_floor: float = setting(0.01, "Smallest seed weight, as a fraction of the mean cluster loss.")


@dataclass
class LossConfig:
    """Which loss, and each loss's parameters (only the chosen loss's section is used)."""

    name: Literal[
        "triplet", "normalized_softmax", "contrastive", "multi_similarity", "softtriple", "pddm",
        "proxy_anchor", "magnet",
    ] = setting(
        "triplet", "Loss by name; the README's table lists each with its parameters."
    )
    lr: float = setting(1e-2, "Learning rate of learned loss parameters (proxies, centers).")
    triplet: TripletSettings = section(TripletSettings, "triplet")
    normalized_softmax: NormalizedSoftmaxSettings = section(NormalizedSoftmaxSettings, "normalized_softmax")
    contrastive: ContrastiveSettings = section(ContrastiveSettings, "contrastive")
    multi_similarity: MultiSimilaritySettings = section(MultiSimilaritySettings, "multi_similarity")
    softtriple: SoftTripleSettings = section(SoftTripleSettings, "softtriple")
    pddm: PDDMSettings = section(PDDMSettings, "pddm")
    proxy_anchor: ProxyAnchorSettings = section(ProxyAnchorSettings, "proxy_anchor")
    magnet: MagnetSettings = section(MagnetSettings, "magnet")


@dataclass
class OptimConfig:
    """Optimizer and learning-rate schedule of the embedding network."""

    name: Literal["adamw", "adam", "sgd"] = setting("adamw", "Optimizer.")
    lr: float = setting(1e-3, "Peak learning rate of the backbone and head.")
    weight_decay: float = setting(1e-4, "Weight decay (decoupled for adamw).")
    momentum: float = setting(0.9, "SGD momentum.")
    warmup_steps: int = setting(50, "Linear warm-up steps.")
    schedule: Literal["cosine", "constant"] = setting("cosine", "Decay after warm-up.")
    grad_clip: float = setting(0.0, "Clip the gradient norm to this; 0 = off.")


@dataclass
class TrainConfig:
    """The distributed run: workers, length, checkpoints, storage."""

    num_workers: int = setting(2, "Ray Train workers (DDP ranks).")
    cpus_per_worker: float = setting(0.5, "CPUs per worker (fractions let Data and Train share 2 cores).")
    use_gpu: bool = setting(False, "Train on GPUs (train.gpus_per_worker each); NCCL and bf16 autocast.")
    gpus_per_worker: float = setting(
        1.0,
        "GPU share of each worker when use_gpu, in (0.5, 1]: below 1 leaves the rest of its GPU to "
        "the refresh actor (refresh.num_gpus), e.g. 0.9 and 0.1 on a one-GPU machine.",
    )
    epochs: int = setting(4, "Epochs; an epoch is steps_per_epoch global batches.")
    steps_per_epoch: int = setting(0, "Steps per epoch; 0 = training images / global batch size.")
    log_every_steps: int = setting(10, "Log loss, learning rate and throughput every this many steps.")
    seed: int = setting(0, "Seed of model init and batch planning.")
    storage_path: str = setting("runs", "Where runs and checkpoints live (path or s3://), and the local MLflow store of a local path.")
    run_name: str = setting("", "Run name; empty = derived from the config (stable, so a rerun resumes).")
    checkpoints_to_keep: int = setting(2, "Checkpoints kept per run.")
    max_failures: int = setting(1, "Worker-group restarts from the last checkpoint before the run fails.")
    torch_threads: int = setting(1, "Intra-op threads per CPU worker.")


@dataclass
class RefreshConfig:
    """The refresh actor: re-embeds the full training set and rebuilds Magnet's cluster index or
    the hard-negative pools (sampler hard_pools)."""

    every_steps: int = setting(0, "Publish weights for a refresh every this many steps; 0 = once per epoch.")
    num_cpus: float = setting(0.5, "CPUs reserved by the actor (its torch and decode threads: at least 1).")
    num_gpus: float = setting(0.0, "GPU (or fraction) for the actor; faiss uses it when faiss-gpu is installed.")
    batch_size: int = setting(256, "Images per embedding batch.")
    cache_max_mb: int = setting(
        2048, "Keep the decoded training images in the actor, as many as fit (held for the whole "
        "run): later refreshes decode only the rest."
    )
    max_restarts: int = setting(3, "Times Ray restarts the actor if it dies.")
    max_plan_ahead_steps: int = setting(
        8, "Plan batches at most this many steps ahead of training, so they use a recent index."
    )
    lag_steps: int = setting(
        0,
        "0 = plan from the newest finished index (training never waits for a refresh; Magnet and PDDM "
        "runs are then not reproducible). L > max_plan_ahead_steps = plan step s from the index of the "
        "last weights published at or before step s - L, with the per-example losses up to that step: "
        "a config and seed then decide every batch, and training waits when that refresh is late.",
    )
    pool_index: str = setting(
        "Flat",
        "faiss index_factory description of the hard pools' kNN search: Flat is exact (N^2, 24 minutes "
        "at 1M images on 2 CPU cores); IVF4096,Flat or HNSW32 are approximate, 3.5-11x faster there "
        "(depending on the data), pools partly inexact.",
    )
    pool_search_params: str = setting(
        "", "faiss ParameterSpace settings of that search, e.g. nprobe=32 (IVF) or efSearch=128 (HNSW)."
    )


@dataclass
class EvalConfig:
    """Retrieval evaluation on the test split."""

    every_epochs: int = setting(1, "Evaluate every this many epochs (and always after the last).")
    batch_size: int = setting(256, "Images per inference batch.")
    recall_ks: list = setting(
        [], "K values of Recall@K; empty = the dataset's protocol (SOP: 1/10/100/1000), else 1/2/4/8."
    )
    nmi: bool = setting(True, "Compute NMI (k-means with as many clusters as test classes).")
    cache_max_mb: int = setting(
        1024, "Each rank keeps its share of each decoded evaluation split in memory after the first "
        "evaluation, if every rank's share fits (MB per rank and split)."
    )
    seen_knn_k: int = setting(
        1, "Seen-class accuracy (with data.seen_holdout_fraction): neighbours in the kNN vote."
    )
    metrics_cpus: int = setting(
        0, "jobs.evaluate on the CPU: CPUs its metrics task reserves and ranks on; 0 = those free "
        "once the images are embedded on the node with most free."
    )


@dataclass
class TrackingConfig:
    """MLflow."""

    tracking_uri: str = setting("", "MLflow tracking URI; empty = a sqlite store in train.storage_path (for s3:// storage, under runs/s3/<bucket>/<prefix> in the working directory).")
    experiment: str = setting("dml", "MLflow experiment name.")
    log_model: bool = setting(True, "Log the final model checkpoint as an artifact.")


@dataclass
class StorageConfig:
    """S3 and S3-compatible stores (MinIO, ...) behind every s3:// path. Credentials come from
    the standard AWS chain (environment, AWS_PROFILE, instance roles), never from the config."""

    s3_endpoint_url: str = setting(
        "", "S3-compatible endpoint, e.g. http://minio:9000; empty = AWS_ENDPOINT_URL(_S3) or AWS."
    )
    s3_max_attempts: int = setting(10, "Tries per S3 request (retries back off exponentially).")


@dataclass
class Config:
    """The whole resolved configuration of one run."""

    data: DataConfig = section(DataConfig, "Data")
    sampler: SamplerConfig = section(SamplerConfig, "Batch planning")
    model: ModelConfig = section(ModelConfig, "Model")
    loss: LossConfig = section(LossConfig, "Loss")
    optim: OptimConfig = section(OptimConfig, "Optimizer")
    train: TrainConfig = section(TrainConfig, "Training")
    refresh: RefreshConfig = section(RefreshConfig, "Refresh actor")
    eval: EvalConfig = section(EvalConfig, "Evaluation")
    tracking: TrackingConfig = section(TrackingConfig, "Tracking")
    storage: StorageConfig = section(StorageConfig, "Object storage (S3)")

    @property
    def sub_batch_size(self) -> int:
        """Examples in one rank's sub-batch."""
        if self.sampler.name == "m_per_class":
            return self.sampler.classes_per_batch * self.sampler.samples_per_class
        if self.sampler.name == "hard_pools":
            s = self.sampler
            return s.classes_per_batch * (s.samples_per_class + s.pool_draws_per_class)
        if self.sampler.name == "neighbourhoods":
            m = self.loss.magnet
            return m.neighbourhoods_per_rank * m.clusters_per_neighbourhood * m.examples_per_cluster
        return self.sampler.batch_size

    @property
    def uses_refresh_actor(self) -> bool:
        """Whether the run starts a refresh actor (its batches follow the model)."""
        return self.sampler.name in ("neighbourhoods", "hard_pools")

    @property
    def global_batch_size(self) -> int:
        """Examples in one optimizer step, across all ranks."""
        return self.sub_batch_size * self.train.num_workers
