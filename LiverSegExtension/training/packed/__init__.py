"""Training on a machine where SimpleITK cannot be installed (a lent GPU): ``pack`` here, ``run`` there, ``finish``
here (``scripts/device_train.py`` is the door). ``run`` imports torch, numpy and MONAI only."""
