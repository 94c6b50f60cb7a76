"""utils/evaluation/results.py: accuracies from per-example masks, the worst case, and the warnings report."""
import logging
import warnings

import torch

from tests.helpers import model_result
from utils.evaluation.results import Report, accuracy, forward_warnings


def test_accuracy_is_exact_from_the_count():
    mask = torch.zeros(200, dtype=torch.bool)
    mask[:113] = True
    assert accuracy(mask) == 56.5  # a float32 mean gives 56.49999976158142
    assert accuracy(torch.zeros(0, dtype=torch.bool)) == 0.0


def test_worst_case_and_table_row():
    r = model_result([1, 1, 1, 0], pgd40=[1, 1, 0, 0], aa=[1, 0, 1, 0])
    assert r.worst.tolist() == [True, False, False, False]
    assert r.table_row() == {"clean": 75.0, "pgd40": 50.0, "aa": 50.0, "worst case": 25.0}
    assert model_result([1, 0]).worst.tolist() == [True, False]  # no attack: the clean mask


def test_report_keeps_each_warning_once_and_forwards_python_and_autoattack_warnings():
    report = Report(echo=False)
    with forward_warnings(report, "aa (m): "):
        warnings.warn("first", stacklevel=1)
        warnings.warn("old API", DeprecationWarning, stacklevel=1)  # library noise, not about the evaluation
        logging.getLogger("auto-attack").warning("randomized defense!")
    report.warn("aa (m): first")
    assert report.messages == ["aa (m): randomized defense!", "aa (m): first"]
