"""The package behaves as PyTorch users expect: modules validate at construction and read their
hyper-parameters at each forward, int32 labels work everywhere, errors point to the right class,
the package is one folder with its types shipped, and every document the code cites exists."""
import importlib.resources
import importlib.util
import inspect
import os
import re

import pytest
import torch

import circleloss_ext as cl
from circleloss_ext import CircleLossFunction
from circleloss_ext.distributed import ShardedCircleLoss
from helpers import device_for, make_inputs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

BAD_OPTIONS = [
    (dict(gamma=0.0), ValueError, "gamma must be a finite number > 0"),
    (dict(m=float("inf")), ValueError, "m must be a finite number"),
    (dict(reduction="batchmean"), ValueError, "reduction must be one of"),
    (dict(backend="cuda"), ValueError, "backend must be one of"),
    (dict(detach_alpha="yes"), TypeError, "detach_alpha must be a bool"),
]


@pytest.mark.parametrize("options,error,message", BAD_OPTIONS, ids=[m for _, _, m in BAD_OPTIONS])
def test_modules_validate_at_construction(options, error, message):
    with pytest.raises(error, match=message):
        cl.CircleLoss(10, 4, **options)
    with pytest.raises(error, match=message):
        cl.PairwiseCircleLoss(**options)


def test_class_head_construction_errors():
    with pytest.raises(TypeError, match="ignore_index must be an int"):
        cl.CircleLoss(10, 4, ignore_index=None)
    with pytest.raises(ValueError, match="num_classes must be a positive int"):
        cl.CircleLoss(0, 4)
    with pytest.raises(ValueError, match="embedding_dim must be a positive int"):
        cl.CircleLoss(10, 4.0)


def test_class_head_without_num_classes_points_to_the_pairwise_loss():
    """pytorch-metric-learning's CircleLoss(m=0.4, gamma=80) is our PairwiseCircleLoss."""
    with pytest.raises(TypeError, match=r"class-level head.*num_classes.*PairwiseCircleLoss"):
        cl.CircleLoss(m=0.4, gamma=80)
    with pytest.raises(TypeError, match="PairwiseCircleLoss"):
        cl.CircleLoss(1000)


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_hyperparameter_schedule_takes_effect(backend):
    device = device_for(backend)
    head = cl.CircleLoss(30, 8, backend=backend).to(device)
    pair = cl.PairwiseCircleLoss(backend=backend)
    emb = torch.randn(9, 8, device=device)
    labels = torch.randint(0, 30, (9,), device=device)
    for step, (m, gamma) in enumerate([(0.25, 256.0), (0.1, 32.0), (0.35, 64.0)]):
        head.m, head.gamma, pair.m, pair.gamma = m, gamma, m, gamma
        head.reduction = pair.reduction = "sum" if step == 2 else "mean"
        expected = cl.circle_loss(emb, head.weight, labels, m=m, gamma=gamma, reduction=head.reduction,
                                  backend=backend)
        torch.testing.assert_close(head(emb, labels), expected)
        torch.testing.assert_close(pair(emb, labels % 3), cl.pairwise_circle_loss(
            emb, labels % 3, m=m, gamma=gamma, reduction=pair.reduction, backend=backend))
    assert "m=0.35, gamma=64.0, reduction='sum'" in repr(head) and "gamma=64.0" in repr(pair)
    head.gamma = -1.0  # a bad value assigned later is refused at the next forward
    with pytest.raises(ValueError, match="gamma must be a finite number > 0"):
        head(emb, labels)


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_int32_labels_give_the_int64_result(backend):
    device = device_for(backend)
    emb, weight, labels, ref_labels = make_inputs(11, 20, 6, num_labels=4, device=device)
    class_labels = torch.randint(0, 20, (11,), device=device)
    class_labels[3] = -100
    pairs = dict(ref_embeddings=weight)
    for fn, args, kwargs in (
            (cl.circle_loss, (emb, weight, class_labels), {}),
            (cl.pairwise_circle_loss, (emb, labels), {}),
            (cl.pairwise_circle_loss, (emb, labels), dict(pairs, ref_labels=ref_labels))):
        expected = fn(*args, backend=backend, reduction="none", **kwargs)
        narrow = [a.int() if not a.is_floating_point() else a for a in args]
        narrow_kwargs = {k: (v.int() if not v.is_floating_point() else v) for k, v in kwargs.items()}
        assert torch.equal(fn(*narrow, backend=backend, reduction="none", **narrow_kwargs), expected)
    head = cl.CircleLoss(20, 6, backend=backend).to(device)
    assert torch.equal(head(emb, class_labels.int()), head(emb, class_labels))
    assert torch.equal(cl.PairwiseCircleLoss(backend=backend)(emb, labels.int(), weight, ref_labels.int()),
                       cl.PairwiseCircleLoss(backend=backend)(emb, labels, weight, ref_labels))
    if backend != "reference":
        rows, _ = CircleLossFunction.apply(emb, weight, class_labels.clamp_min(-1).int(), None, 0.25, 256.0, True,
                                           backend)
        rows64, _ = CircleLossFunction.apply(emb, weight, class_labels.clamp_min(-1), None, 0.25, 256.0, True,
                                             backend)
        assert torch.equal(rows, rows64)


def test_other_integer_labels_are_refused():
    emb, weight, labels, _ = make_inputs(5, 7, 3, device="cpu")
    for dtype in (torch.int16, torch.int8, torch.uint8, torch.bool):
        with pytest.raises(TypeError, match=f"labels must have dtype torch.int64 or torch.int32, got {dtype}"):
            cl.circle_loss(emb, weight, labels.to(dtype))
        with pytest.raises(TypeError, match="labels must have dtype torch.int64 or torch.int32"):
            cl.PairwiseCircleLoss()(emb, labels.to(dtype))


def test_the_package_is_one_folder_with_its_types():
    assert len(cl.__path__) == 1 and os.path.basename(cl.__path__[0]) == "circleloss_ext"
    for name in ("circleloss_ext.setup", "circleloss_ext.benchmarks", "circleloss_ext.tests"):
        assert importlib.util.find_spec(name) is None, name
    import circleloss_ext.kernels as kernels
    assert os.path.basename(os.path.dirname(kernels.__file__)) == "kernels"  # the top-level folder, installed
    assert importlib.resources.files("circleloss_ext").joinpath("py.typed").is_file()


PUBLIC_CALLABLES = [cl.circle_loss, cl.pairwise_circle_loss, cl.CircleLoss.__init__, cl.CircleLoss.forward,
                    cl.PairwiseCircleLoss.__init__, cl.PairwiseCircleLoss.forward, ShardedCircleLoss.__init__,
                    ShardedCircleLoss.forward]


@pytest.mark.parametrize("fn", PUBLIC_CALLABLES, ids=[f.__qualname__ for f in PUBLIC_CALLABLES])
def test_public_api_is_typed(fn):
    signature = inspect.signature(fn)
    missing = [name for name, p in signature.parameters.items()
               if name != "self" and p.annotation is inspect.Parameter.empty]
    assert not missing and signature.return_annotation is not inspect.Signature.empty, missing


def test_every_cited_document_exists():
    cited = set()
    for folder in ("circleloss_ext", "kernels", "csrc", "tests", "benchmarks", "examples"):
        for root, _, files in os.walk(os.path.join(REPO, folder)):
            for name in files:
                if name.endswith((".py", ".cpp")):
                    text = open(os.path.join(root, name), encoding="utf-8").read()
                    cited |= {(name, ref) for ref in re.findall(r"[\w./-]+\.md", text)}
    assert cited, "no document cited at all: the pattern is wrong"
    missing = [(name, ref) for name, ref in cited
               if not any(os.path.exists(os.path.join(REPO, base, ref)) for base in ("", "docs", "benchmarks"))]
    assert not missing, missing


@pytest.mark.parametrize("fn", [cl.circle_loss, cl.pairwise_circle_loss, cl.CircleLoss, cl.PairwiseCircleLoss,
                                ShardedCircleLoss])
def test_docstrings_name_every_backend(fn):
    for backend in ("auto", "triton", "cpu", "reference"):
        assert f'"{backend}"' in fn.__doc__, backend


@pytest.mark.parametrize("backend", ["triton", "cpu"])
def test_fused_backends_provide_the_backend_interface(backend):
    """kernels/ and circleloss_ext._C both provide what ops.FusedBackend names (the contract for a new
    backend); the Triton launchers also take its arguments by the same names."""
    from circleloss_ext import ops
    impl = ops._kernels(backend)
    for name, member in inspect.getmembers(ops.FusedBackend, inspect.isfunction):
        if name.startswith("_"):
            continue
        assert callable(getattr(impl, name, None)), f"{backend} lacks {name}"
        if backend == "triton":
            expected = [p for p in inspect.signature(member).parameters if p != "self"]
            assert list(inspect.signature(getattr(impl, name)).parameters) == expected, name


def test_every_subpackage_is_packaged():
    """A wheel holds only the packages pyproject.toml lists: every folder of circleloss_ext with an
    __init__.py must be among them (CI installs the wheel, not the source tree)."""
    import tomllib
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        listed = set(tomllib.load(f)["tool"]["setuptools"]["packages"])
    found = {"circleloss_ext." + name for name in os.listdir(os.path.join(REPO, "circleloss_ext"))
             if os.path.isfile(os.path.join(REPO, "circleloss_ext", name, "__init__.py"))}
    assert found | {"circleloss_ext", "circleloss_ext.kernels"} == listed
