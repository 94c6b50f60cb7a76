"""utils/evaluation/api.py: a model in memory gives test_comparison.py's results and table."""
import pytest
import torch
import torch.nn as nn

from models import get_model
from tests.helpers import markdown_tables
from tests.test_test_comparison import _run
from utils.data.loaders import load_splits
from utils.evaluation.api import TensorSplit, as_split, evaluate
from utils.evaluation.results import first_examples


@pytest.fixture(scope="module")
def weak_model():
    torch.manual_seed(0)
    model = get_model("smallcnn-nobn", 10, 3).eval()
    nn.init.normal_(model.classifier[-1].weight, std=0.3)
    return model


def test_the_api_gives_the_scripts_table_and_masks(weak_model, tmp_path, capsys):
    torch.save(weak_model.state_dict(), tmp_path / "m.pth")
    argv = ["--checkpoint", tmp_path / "m.pth", "--arch", "smallcnn-nobn", "--name", "model", "--attacks",
            "pgd3,mifgsm", "--n-examples", "40", "--batch-size", "16"]
    code, out, err = _run(capsys, argv)
    assert code == 0, err
    split = first_examples(load_splits("synthetic", "data", test_limit=64, seed=0)[0]["test"], 40)
    x, y = split.images.float() / 255, split.labels
    found = evaluate(weak_model, (split.images, y), "pgd3,mifgsm", batch_size=16, echo=False)
    assert found.table == out.split("\n\n")[0]  # the script's table, character for character
    assert markdown_tables(found.table)[0][0]["model"] == "model"
    # Float images and a loader of batches give the same per-example masks as the uint8 split.
    loader = [(x[i:i + 8], y[i:i + 8]) for i in range(0, 40, 8)]
    for data in ((x, y), loader):
        again = evaluate({"model": weak_model}, data, ["pgd3", "mifgsm"], batch_size=16, echo=False)
        for a, b in zip(found.results, again.results, strict=True):
            assert torch.equal(a.clean, b.clean) and a.robust.keys() == b.robust.keys()
            assert all(torch.equal(a.robust[k], b.robust[k]) for k in a.robust)
    row = found.rows()["model"]
    assert row["worst case"] <= row["pgd3"] < row["clean"]
    assert found.json()["models"][0]["correct"]["clean"] == int(found.results[0].clean.sum())


def test_the_api_refuses_images_outside_the_unit_box():
    with pytest.raises(ValueError, match=r"\[0, 1\].*Normalized"):
        as_split((torch.randn(4, 3, 8, 8), torch.zeros(4, dtype=torch.long)))
    with pytest.raises(ValueError, match="labels"):
        as_split((torch.rand(4, 3, 8, 8), torch.zeros(3, dtype=torch.long)))
    assert isinstance(as_split((torch.rand(4, 3, 8, 8), torch.zeros(4, dtype=torch.int32))), TensorSplit)
