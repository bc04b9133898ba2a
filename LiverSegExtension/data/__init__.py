"""Data: MSD-layout datasets as training reads them (``msd``), correction datasets that doors add cases to
(``corrections``), metrics (``metrics``) and the evaluation of a model on a dataset (``evaluation``).
"""
