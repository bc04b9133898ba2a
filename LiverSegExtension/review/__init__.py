"""Reviewing a batch's results, case after case: the worklist read from a batch output folder's summary.csv
(``worklist``), its masks read onto their CTs (``masks``), the review state kept beside it in review.csv
(``state``) and what the review says about the model (``status``, ``liverseg review status OUT``). Plain
Python: the Slicer panel and the CLI both use it.
"""

from LiverSegExtension.review.state import CLAIM_MINUTES, DECISIONS, REVIEW_FIELDS, REVIEW_FILE, ReviewState
from LiverSegExtension.review.worklist import ReviewCase, ct_input, read_worklist

__all__ = ["CLAIM_MINUTES", "DECISIONS", "REVIEW_FIELDS", "REVIEW_FILE", "ReviewState", "ReviewCase", "ct_input",
           "read_worklist"]
