"""Use a trained model: evaluate a checkpoint on any dataset, export embeddings and a faiss index.

`checkpoints` finds and fetches a checkpoint, `embedding` runs Ray Data batch inference,
`index` builds and reads the faiss index, `export` and `evaluation` are what the jobs call.
"""
