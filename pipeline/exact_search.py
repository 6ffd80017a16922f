"""Exact squared-L2 nearest-neighbour search, on a GPU whenever one is visible.

faiss's `IndexFlatL2` is the search everywhere: on the CPU, or as its GPU index where faiss-gpu
is installed. But faiss-gpu's wheels are built for CUDA 12 alone, so on a machine whose torch
is a CUDA 13 build (as on the GPU machines this project is measured on) faiss sees no GPU while
torch does. There `TorchFlatL2` runs the same exact search on torch's CUDA device: blocks of
queries against the whole set, distances by one matrix product (||q||^2 + ||x||^2 - 2 q.x, as
faiss computes them for batches) and `torch.topk`. It has `IndexFlatL2`'s `add`/`search`/`ntotal`, so the
evaluation, the PDDM pools and Magnet's impostor search take either. faiss-gpu, where present,
is preferred; torch also takes the searches deeper than faiss-gpu's 2048 neighbours.
"""

from __future__ import annotations

import contextlib
import io

import numpy as np
import torch

FAISS_GPU_MAX_K = 2048
"""faiss's GPU k-selection returns at most this many neighbours per query."""


class TorchFlatL2:
    """Exact squared-L2 k-NN index on a torch device, with faiss's `IndexFlatL2` interface.

    Memory: the vectors on the device, plus one [rows, ntotal] float32 block of distances per
    search step, `rows` chosen so the block stays within `block_bytes`. The distances are full
    float32 while TF32 matrix products stay off (torch's default): a process that turns them on
    (`torch.set_float32_matmul_precision("high")`) makes the ranking of near ties approximate.
    """

    def __init__(self, dim: int, device: torch.device | str = "cuda", block_bytes: int = 1 << 30):
        self.d = int(dim)
        self.device = torch.device(device)
        self.block_bytes = int(block_bytes)
        self._vectors = torch.empty((0, self.d), dtype=torch.float32, device=self.device)
        self._norms = torch.empty((0,), dtype=torch.float32, device=self.device)

    @property
    def ntotal(self) -> int:
        """Vectors held, as faiss names it."""
        return int(self._vectors.shape[0])

    @property
    def is_trained(self) -> bool:
        """Always true: a flat index needs no training (faiss's attribute)."""
        return True

    def add(self, vectors: np.ndarray) -> None:
        """Append [n, d] vectors; their ids follow the ones already held."""
        self.add_tensor(self._on_device(vectors))

    def add_tensor(self, vectors: torch.Tensor) -> None:
        """`add` of float32 vectors already on the device."""
        self._vectors = torch.cat([self._vectors, vectors])
        self._norms = torch.cat([self._norms, vectors.square().sum(dim=1)])

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(distances [n, k] float32, ids [n, k] int64) of each query's k nearest vectors,
        nearest first; like faiss, ids beyond `ntotal` are -1 with infinite distance."""
        distances, ids = self.search_tensor(self._on_device(queries), k)
        return distances.cpu().numpy(), ids.cpu().numpy()

    def search_tensor(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """`search` of float32 queries already on the device; the results stay there."""
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        n, found = len(queries), min(k, self.ntotal)
        distances = torch.full((n, k), float("inf"), dtype=torch.float32, device=self.device)
        ids = torch.full((n, k), -1, dtype=torch.int64, device=self.device)
        if found == 0:
            return distances, ids
        rows = max(1, self.block_bytes // (4 * self.ntotal))
        with torch.no_grad():
            for start in range(0, n, rows):
                block = queries[start : start + rows]
                # ||q||^2 + ||x||^2 - 2 q.x in one GEMM; rounding can leave tiny negatives.
                squared = torch.addmm(self._norms[None, :], block, self._vectors.T, alpha=-2.0)
                squared += block.square().sum(dim=1, keepdim=True)
                best, where = torch.topk(squared.clamp_min_(0.0), found, dim=1, largest=False, sorted=True)
                distances[start : start + len(block), :found] = best
                ids[start : start + len(block), :found] = where
        return distances, ids

    def _on_device(self, vectors: np.ndarray) -> torch.Tensor:
        array = np.ascontiguousarray(vectors, dtype=np.float32)
        if array.ndim != 2 or array.shape[1] != self.d:
            raise ValueError(f"expected vectors of shape [n, {self.d}], got {array.shape}")
        return torch.from_numpy(array).to(self.device)


def faiss_gpu_count() -> int:
    """GPUs faiss can use here (0 with faiss-cpu)."""
    import faiss

    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0


def gpu_backend(k: int) -> str | None:
    """Which GPU search serves a k-NN search here: "faiss" (faiss-gpu, k <= 2048), "torch"
    (torch's CUDA device), or None when neither sees a GPU."""
    if k <= FAISS_GPU_MAX_K and faiss_gpu_count() > 0:
        return "faiss"
    if torch.cuda.is_available():
        return "torch"
    return None


def faiss_to_gpu(index):
    """A faiss-gpu copy of a CPU `index` on this process's own GPU (torch's current device).
    Not faiss's `index_cpu_to_all_gpus`: a Train rank sees the GPUs of the ranks beside it on
    its node, and would put a copy and faiss's scratch memory on each of theirs."""
    import faiss

    # (torch's current device only where torch already uses CUDA: asking would create a
    # context of some hundred MB in a process where only faiss does)
    device = torch.cuda.current_device() if torch.cuda.is_initialized() else 0
    return faiss.index_cpu_to_gpus_list(index, gpus=[device])


def faiss_kmeans(dim: int, k: int, *, on_gpu: bool, **parameters):
    """`faiss.Kmeans(dim, k, **parameters)`, its assignment index on this process's own GPU
    (`faiss_to_gpu`) when `on_gpu`: faiss's own `gpu=True` takes every GPU the process sees."""
    import faiss

    kmeans = faiss.Kmeans(dim, k, **parameters)
    if on_gpu:
        kmeans.index = faiss_to_gpu(kmeans.index)
    return kmeans


def torch_device() -> torch.device:
    """The device of the "torch" backend."""
    return torch.device("cuda")


def flat_l2_index(vectors: np.ndarray, *, use_gpu: bool, k: int):
    """An exact squared-L2 index holding `vectors` [n, d], to be searched for up to `k`
    neighbours: on the GPU when `use_gpu` and one is visible (`gpu_backend`), else faiss's CPU
    index. Returns anything with `search(queries, k) -> (distances, ids)`."""
    import faiss

    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    backend = gpu_backend(k) if use_gpu else None
    if backend == "torch":
        index = TorchFlatL2(vectors.shape[1], torch_device())
    else:
        index = faiss.IndexFlatL2(vectors.shape[1])
        if backend == "faiss":
            index = faiss_to_gpu(index)
    index.add(vectors)
    return index


def torch_kmeans(points: np.ndarray, k: int, *, seed: int, niter: int = 20,
                 device: torch.device | str | None = None) -> np.ndarray:
    """Assignment [n] of `points` to k k-means clusters, on torch's device: faiss's own k-means
    loop (`faiss.contrib.clustering.kmeans`, the C++ one's steps in Python) with each
    assignment step searched by `TorchFlatL2`. For where faiss has no GPU but torch has."""
    from faiss.contrib import clustering

    device = torch.device(device) if device is not None else torch_device()
    data = torch.from_numpy(np.ascontiguousarray(points, dtype=np.float32)).to(device)
    with contextlib.redirect_stdout(io.StringIO()):  # the contrib loop prints even when not verbose
        centroids = clustering.kmeans(k, _TorchAssign(data), niter=niter, seed=seed, verbose=False)
    index = TorchFlatL2(data.shape[1], device)
    index.add_tensor(centroids)
    return index.search_tensor(data, 1)[1][:, 0].cpu().numpy()


class _TorchAssign:
    """faiss.contrib.clustering's dataset interface over a torch tensor, searched by TorchFlatL2."""

    def __init__(self, data: torch.Tensor):
        self.x = data

    def count(self) -> int:
        return self.x.shape[0]

    def dim(self) -> int:
        return self.x.shape[1]

    def get_subset(self, indices) -> torch.Tensor:
        # A copy: the loop edits its centroids in place (splitting them into empty clusters).
        return self.x[torch.as_tensor(indices, device=self.x.device)].clone()

    def assign_to(self, centroids: torch.Tensor, weights=None):
        """(nearest centroid of each point as numpy, its squared distance, per-centroid sums)."""
        index = TorchFlatL2(self.dim(), self.x.device)
        index.add_tensor(centroids)
        distances, ids = index.search_tensor(self.x, 1)
        sums = torch.zeros_like(centroids)
        sums.index_add_(0, ids[:, 0], self.x if weights is None else self.x * weights[:, None])
        return ids[:, 0].cpu().numpy(), distances[:, 0], sums
