"""CUDA: every training script with the fast path and a resume, stage 3 compiled, NAMID's loss under
bf16 against fp32, every attack, the batch loader with its generator, and the per-batch evaluation
without host syncs, on the first GPU. Skipped without CUDA; benchmarks/gpu_session.sh runs this
file first on a GPU machine. Each test's peak GPU memory is printed and recorded in the JUnit XML."""
import importlib.util
import json
import math
import warnings

import pytest
import torch

import train_MI_estimator
import train_standard
from models import get_model
from models.estimator import build_estimator
from tests.helpers import markdown_tables, run_script
from tests.test_test_comparison import SCRIPT, _script
from utils.attacks.base import lp_norm
from utils.attacks.pgd import pgd
from utils.attacks.registry import BUDGET_TOL, build_attack, robust_mask
from utils.data.loaders import BatchLoader
from utils.data.splits import Split
from utils.data.synthetic import synthetic_info
from utils.namid import freeze, namid_objective
from utils.training.fast import FastPath
from utils.training.loop import evaluate

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

CUDA = torch.device("cuda")
FAST = ["--device", "cuda", "--amp", "--channels-last"]
# 48 training images, less the tenth that stages 1 and 3 hold out: every stage ends its epochs on a partial batch.
DATA = ["--dataset", "synthetic", "--train-limit", "48", "--test-limit", "32", "--batch-size", "32",
        "--epsilon", "0.1", "--num-steps", "2", "--eval-steps", "2", "--no-progress"]
HSIZE = "32"
HAVE_AUTOATTACK = importlib.util.find_spec("pyautoattack") is not None


@pytest.fixture(autouse=True)
def peak_memory(request, record_testsuite_property):
    """Each test starts from a fresh peak; what it reached is printed and goes into the JUnit XML."""
    torch.cuda.reset_peak_memory_stats()
    yield
    mib = torch.cuda.max_memory_allocated() / 2**20
    print(f"{request.node.name}: peak GPU memory {mib:.1f} MiB")
    record_testsuite_property(f"peak_memory_MiB:{request.node.name}", f"{mib:.1f}")


@pytest.fixture(scope="module")
def pre_target(tmp_path_factory):
    """A stage-1 SmallCNN for stage 2 (plain fp32 CUDA run: the scripts' fast path is tested below)."""
    run = tmp_path_factory.mktemp("stage1")
    train_standard.main([*DATA, "--arch", "smallcnn", "--epochs", "1", "--device", "cuda", "--model-dir", str(run)])
    return run / "best_model.pth"


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    """A SmallCNN trained clean well above chance (10 %), so that the attacks have images to break."""
    run = tmp_path_factory.mktemp("classifier")
    train_standard.main(["--dataset", "synthetic", "--arch", "smallcnn", "--train-limit", "256", "--test-limit", "16",
                         "--epochs", "5", "--warm-up-epochs", "5", "--lr", "0.05", "--lr-milestones", "--batch-size",
                         "32", "--eval-steps", "1", "--no-progress", "--device", "cuda", "--model-dir", str(run)])
    return run / "best_model.pth"


@pytest.fixture(scope="module")
def mi_dir(pre_target, tmp_path_factory):
    """Stage-2 estimators (H = 32) of that target, for stage 3."""
    run = tmp_path_factory.mktemp("stage2")
    train_MI_estimator.main([*DATA, "--arch", "smallcnn", "--va-hsize", HSIZE, "--pre-target", str(pre_target),
                             "--epochs", "1", "--device", "cuda", "--model-dir", str(run)])
    return run


def records(folder):
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def trained_state(folder):
    last = torch.load(folder / "last.pth", weights_only=True, map_location="cpu")
    return last, last["model"] if "model" in last else last["estimators"]


def finite_metrics(record):
    numbers = {k: v for k, v in record.items() if isinstance(v, float)}
    assert numbers and all(math.isfinite(v) for v in numbers.values()), record
    for key in ("clean_acc", "pgd_acc"):
        assert 0 <= record[key] <= 100, (key, record)


def train_then_resume(capsys, script, argv, folder):
    """One epoch, then ``--resume`` with ``--epochs 2``: the resumed run must start at epoch 2, keep
    epoch 1's metrics line as it was and go on training; returns both records."""
    code, out, err = run_script(capsys, script, [*argv, "--epochs", "1", "--model-dir", folder])
    assert code == 0, err
    first = records(folder)
    assert [r["epoch"] for r in first] == [1] and "epoch=1 " in out
    last, before = trained_state(folder)
    assert last["epoch"] == 1
    assert "cuda" in last["rng"]  # the GPU's RNG state is kept, so the resumed attacks draw what they would have

    code, out, err = run_script(capsys, script, [*argv, "--epochs", "2", "--model-dir", folder, "--resume"])
    assert code == 0, err
    assert "epoch=2 " in out and "epoch=1 " not in out  # it continued instead of starting again
    both = records(folder)
    assert [r["epoch"] for r in both] == [1, 2] and both[0] == first[0]
    last, after = trained_state(folder)
    assert last["epoch"] == 2
    assert any(not torch.equal(before[k], after[k]) for k in before if after[k].is_floating_point())
    for record in both:
        finite_metrics(record)
    return both


# ---------------------------------------------------------------- the training scripts


@pytest.mark.parametrize("arch", ["smallcnn", "resnet18"])
def test_stage1_with_the_fast_path_resumes(arch, tmp_path, capsys):
    both = train_then_resume(capsys, "train_standard", [*DATA, *FAST, "--arch", arch], tmp_path / "run")
    assert all(r["train_epsilon"] == pytest.approx(0.1) for r in both)


@pytest.mark.parametrize("script", ["train_MI_estimator", "train_MI_estimator_only_max"])
def test_stage2_with_the_fast_path_resumes(script, pre_target, tmp_path, capsys):
    argv = [*DATA, *FAST, "--arch", "smallcnn", "--va-hsize", HSIZE, "--pre-target", pre_target]
    folder = tmp_path / "mi"
    train_then_resume(capsys, script, argv, folder)
    for name in ("local_n_model.pth", "global_n_model.pth", "local_a_model.pth", "global_a_model.pth"):
        state = torch.load(folder / name, weights_only=True, map_location="cpu")
        assert all(torch.isfinite(v.float()).all() for v in state.values()), name


def test_stage3_with_the_fast_path_resumes(mi_dir, tmp_path, capsys):
    # Random estimators on a tiny run may well fall to chance: the guard is tested on the CPU.
    argv = [*DATA, *FAST, "--arch", "smallcnn", "--va-hsize", HSIZE, "--mi-dir", mi_dir, "--no-collapse-guard"]
    both = train_then_resume(capsys, "train_MIAT", argv, tmp_path / "namid")
    for record in both:
        assert {"l_adv", "l_mi", "cos_nat", "cos_adv", "lam_term", "w_size"} <= set(record)
    assert (tmp_path / "namid" / "target_model.pth").is_file()


# ---------------------------------------------------------------- NAMID's loss under bf16


def test_namid_objective_under_bf16_autocast_is_within_tolerance_of_fp32(monkeypatch):
    """The same batch, fp32 and under bf16 autocast.

    bf16 keeps 8 significant bits, so each rounding is within u = 2^-8 ≈ 3.9e-3 relative. The
    target's 7 layers and the global net's 3 round in series: the logits and global features are
    within about 10u ≈ 4e-2 relative (errors adding up in the worst case), and the MI scores and
    the losses are formed from them in fp32 (utils/training/loop.py FastPath), without bf16 rounding of
    their own. Hence rtol 5e-2 on L_all, L_adv, L_mi and the λ term. The cosine terms |1 − cos| are
    differences of numbers near 1 and may be tiny, so a relative bound means nothing for them:
    their error is the cosine's own, compared with atol u (a CPU's bf16 kernels stay under 3e-4).

    The model is in eval mode (BatchNorm on running statistics), so that each sample's logits do
    not depend on the others and the batch can be cut down to the samples whose prediction is
    clear in both precisions: then W, which the argmax decides, is the same set in both runs.
    Train-mode BatchNorm under bf16 runs in the stage-3 test above. cuDNN's fp32 convolutions may
    use TF32 (11 significant bits) by default: switched off here, so that fp32 is fp32."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    torch.manual_seed(0)
    model = get_model("smallcnn", 10, 3).to(CUDA).eval()
    torch.nn.init.normal_(model.classifier[-1].weight)  # the zero-initialised last layer gives equal logits
    est_n, est_a = (freeze(build_estimator(3, 10, 64).to(CUDA)) for _ in range(2))
    x = torch.rand(256, 3, 32, 32, device=CUDA)
    with torch.no_grad():
        y = model(x).argmax(dim=1)
    x_adv = pgd(model, x, y, 0.1, 0.025, 5)

    keep = torch.ones(len(x), dtype=torch.bool, device=CUDA)
    with torch.no_grad():
        for batch in (x, x_adv):
            fp32 = model(batch).float()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                bf16 = model(batch).float()
            top2 = fp32.topk(2, dim=1).values
            error = (fp32 - bf16).abs().amax(dim=1)
            keep &= (fp32.argmax(dim=1) == bf16.argmax(dim=1)) & (top2[:, 0] - top2[:, 1] > 4 * error)
    x, x_adv, y = x[keep], x_adv[keep], y[keep]

    results = {}
    for amp in (False, True):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            loss, logits_adv, terms = namid_objective(model, est_n, est_a, x, x_adv, y, alpha=5.0, lam=0.1)
        results[amp] = (loss.detach(), logits_adv.dtype, terms)
    (loss32, dtype32, t32), (loss16, dtype16, t16) = results[False], results[True]
    assert dtype32 == torch.float32 and dtype16 == torch.bfloat16  # the forward passes did run in bf16
    assert loss16.dtype == torch.float32 and all(t.dtype == torch.float32 for t in t16.values())
    assert t16["w_size"] == t32["w_size"] >= 16  # the same W, large enough for the cosines to mean something
    assert loss16 != loss32  # so the loss is not fp32's to the bit ...
    torch.testing.assert_close(loss16, loss32, rtol=5e-2, atol=0)  # ... but within the bound
    for name in ("l_adv", "l_mi", "lam_term"):
        torch.testing.assert_close(t16[name], t32[name], rtol=5e-2, atol=0, msg=name)
    for name in ("cos_nat", "cos_adv"):
        torch.testing.assert_close(t16[name], t32[name], rtol=0, atol=2**-8, msg=name)


# ---------------------------------------------------------------- the attacks of test_comparison.py

ATTACKS = ["pgd10", "l2-pgd10", "fwa5", "fwa-fw5", "tidim", "mifgsm", "cw", "ddn", "aa"]


def random_net(seed=0):
    torch.manual_seed(seed)
    model = get_model("smallcnn", 10, 3).to(CUDA).eval()
    torch.nn.init.normal_(model.classifier[-1].weight, std=0.3)
    return model


@pytest.mark.parametrize("name", ATTACKS)
def test_attack_on_cuda_stays_finite_in_the_box_and_the_budget(name):
    if name == "aa" and not HAVE_AUTOATTACK:
        pytest.skip("AutoAttack needs the pyautoattack package")
    model = random_net()
    x = torch.rand(8, 3, 32, 32, device=CUDA)
    with torch.no_grad():
        y = model(x).argmax(dim=1)  # every image classified correctly: each one is the attack's to break
    attack = build_attack(name)
    x_adv = attack(model, x, y)
    assert x_adv.device == x.device and x_adv.shape == x.shape and x_adv.dtype == x.dtype
    assert torch.isfinite(x_adv).all()
    assert x_adv.min() >= -BUDGET_TOL and x_adv.max() <= 1 + BUDGET_TOL
    if attack.budget in ("linf", "l2") and not attack.minimum_norm:
        assert lp_norm(x_adv - x, attack.norm).max() <= attack.epsilon + BUDGET_TOL
    assert (x_adv != x).any()  # it moved
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        robust = robust_mask(model, x, y, x_adv, attack)
    assert robust.device == x.device and robust.dtype == torch.bool and robust.shape == y.shape
    assert not [w for w in caught if "outside" in str(w.message)]


def test_comparison_table_of_every_attack_on_cuda(classifier, tmp_path, capsys):
    attacks = [a for a in ATTACKS if a != "aa" or HAVE_AUTOATTACK]
    _script()
    code, out, err = run_script(capsys, SCRIPT, [
        "--dataset", "synthetic", "--test-limit", "64", "--no-progress", "--device", "cuda",
        "--checkpoint", classifier, "--arch", "smallcnn", "--attacks", ",".join(attacks), "--n-examples", "8",
        "--batch-size", "8", "--out", tmp_path / "r.json", "--md", tmp_path / "r.md"])
    assert code == 0, err
    (model,) = json.loads((tmp_path / "r.json").read_text())["models"]
    assert model["n"] == 8 and list(model["attacks"]) == attacks
    assert model["attacks"]["pgd10"] < model["clean"]  # there were images to attack, and they were broken
    for name, accuracy in model["attacks"].items():
        assert 0 <= accuracy <= model["clean"], name
    (rows, *_) = markdown_tables(out)
    assert list(rows[0]) == ["model", "clean", *attacks, "worst case"]
    assert (tmp_path / "r.md").read_text() == out


# ---------------------------------------------------------------- the batch loader


def centre_ids(x):
    """The sample each image came from: images are filled with their index, and a crop of at most
    one pixel (the padding of 4×4 images) never moves the centre pixel (2, 2) out of the image."""
    return (x[:, 0, 2, 2] * 255).round().long()


def indexed_split(n, device):
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 1, 4, 4).contiguous()
    return Split(images.to(device), torch.arange(n, device=device))


def batches(split, generator, device):
    loader = BatchLoader(split, 16, shuffle=True, augment=True, info=synthetic_info((1, 4, 4), 10),
                         device=device, generator=generator)
    return [(x.clone(), y.clone()) for x, y in loader]


@pytest.mark.parametrize("generator_device", ["cpu", "cuda"])
def test_batch_loader_shuffles_and_augments_on_the_gpu_reproducibly(generator_device):
    n = 70  # four full batches of 16 and one of 6
    split = indexed_split(n, CUDA)
    generator = torch.Generator(device=generator_device).manual_seed(0)
    first = batches(split, generator, CUDA)
    assert [len(y) for _, y in first] == [16, 16, 16, 16, 6]
    for x, y in first:
        assert x.device.type == y.device.type == "cuda" and x.dtype == torch.float32 and y.dtype == torch.int64
        assert 0 <= x.min() and x.max() <= 1
        assert torch.equal(centre_ids(x), y)  # images and labels stay paired through the gather
    order = torch.cat([y for _, y in first])
    assert sorted(order.tolist()) == list(range(n)) and order.tolist() != list(range(n))  # a permutation
    x = torch.cat([x for x, _ in first])
    shifted = (x[..., 0, :] == 0).all(dim=-1) | (x[..., -1, :] == 0).all(dim=-1) | \
              (x[..., :, 0] == 0).all(dim=-1) | (x[..., :, -1] == 0).all(dim=-1)
    assert shifted[order > 0].float().mean() > 0.5  # most crops moved the image: zero padding came in

    # The same seed gives the same batches; a saved state replays the next pass.
    again = batches(split, torch.Generator(device=generator_device).manual_seed(0), CUDA)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, again))
    state = generator.get_state()
    second = batches(split, generator, CUDA)
    generator.set_state(state)
    replay = batches(split, generator, CUDA)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(second, replay))
    assert not torch.equal(torch.cat([y for _, y in second]), order)  # a new pass, a new order

    if generator_device == "cpu":  # the scripts' case: the same batches as the same loader on the CPU
        on_cpu = batches(indexed_split(n, "cpu"), torch.Generator().manual_seed(0), "cpu")
        assert all(torch.equal(a[0].cpu(), b[0]) and torch.equal(a[1].cpu(), b[1]) for a, b in zip(first, on_cpu))


# ---------------------------------------------------------------- host syncs of the evaluation


class SyncsAreErrors:
    """``loader``'s batches, with every synchronising CUDA call an error from the first batch's
    arrival until the last one is consumed: the loader's one-off set-up before it, and the caller's
    read-out after it, are allowed."""

    def __init__(self, loader):
        self.loader = loader

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        iterator = iter(self.loader)
        first = next(iterator)
        torch.cuda.set_sync_debug_mode("error")
        try:
            yield first
            yield from iterator
        finally:
            torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("fast", [FastPath(), FastPath(amp=True, channels_last=True)], ids=["fp32", "amp-nhwc"])
def test_pgd_evaluation_does_not_sync_with_the_host_per_batch(fast):
    model = random_net()
    if fast.channels_last:
        model = model.to(memory_format=torch.channels_last)
    images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    loader = BatchLoader(Split(images, torch.arange(64) % 10).to(CUDA), 16, device=CUDA)
    args = (0.1, 0.025, 3, "linf")
    evaluate(model, loader, *args, progress=False, fast=fast)  # warm-up: cuDNN's choices, lazy initialisation
    try:
        stats = evaluate(model, SyncsAreErrors(loader), *args, progress=False, fast=fast)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert set(stats) == {"clean_acc", "pgd_acc"}
    assert 0 <= stats["pgd_acc"] <= stats["clean_acc"] <= 100


# ---------------------------------------------------------------- stage 3 compiled (slowest: last)


def test_stage3_compiled_trains_two_epochs_with_a_partial_last_batch(mi_dir, tmp_path, capsys):
    from torch._dynamo.utils import counters

    counters.clear()
    # 150 images less a held-out tenth: batches of 64, 64 and 7.
    argv = [*DATA, "--train-limit", "150", "--batch-size", "64", "--device", "cuda", "--compile", "--arch",
            "smallcnn", "--va-hsize", HSIZE, "--mi-dir", mi_dir, "--epochs", "2", "--no-collapse-guard",
            "--model-dir", tmp_path / "run"]
    code, out, err = run_script(capsys, "train_MIAT", argv)
    assert code == 0, err
    both = records(tmp_path / "run")
    assert [r["epoch"] for r in both] == [1, 2]
    for record in both:
        finite_metrics(record)
    assert counters["stats"]["unique_graphs"] >= 1  # Dynamo did compile the target
    print(f"compiled graphs: {counters['stats']['unique_graphs']}")
    # A checkpoint of the compiled model loads into the plain one: no "_orig_mod." keys.
    model = get_model("smallcnn", 10, 3)
    model.load_state_dict(torch.load(tmp_path / "run" / "target_model.pth", weights_only=True, map_location="cpu"))
