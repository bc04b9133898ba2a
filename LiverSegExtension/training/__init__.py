"""Training and fine-tuning: the training loop (``loop``), its augmentations (``augment``), and the guarded
fine-tuning recipe (``finetune``).
"""
