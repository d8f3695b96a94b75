"""The embed worker's concern: the model on its device, dynamic batching, CUDA graphs, the embedding cache, one process
per GPU.
"""
