"""Models: their folders and cards (``catalog``, no torch), the networks and their files (``networks``,
``unet``: safetensors and the ONNX twin), and where they run (``runtimes``: ONNX Runtime or PyTorch; ``devices``).

Nothing here is imported by the package itself: ``catalog`` and ``runtimes`` must load without torch.
"""
