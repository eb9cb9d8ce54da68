"""Bad input raises at the public boundary with a message naming the argument."""

import pytest
import torch

import fastcl


def x(n=4, d=3, dtype=torch.float32):
    return torch.randn(n, d, dtype=dtype)


CASES = [
    ("query rank", lambda: fastcl.info_nce(torch.randn(4), x()), ValueError, "query must be 2-D"),
    ("key width", lambda: fastcl.info_nce(x(4, 3), x(4, 5)), ValueError, "feature width"),
    ("empty", lambda: fastcl.info_nce(x(0, 3), x()), ValueError, "query must not be empty"),
    ("not a tensor", lambda: fastcl.info_nce([[1.0]], x()), TypeError, "query must be a torch.Tensor"),
    ("integer features", lambda: fastcl.info_nce(torch.ones(4, 3, dtype=torch.long), x()), TypeError, "floating"),
    ("tower dtypes", lambda: fastcl.clip_loss(x(), x(dtype=torch.float64), 10.0), TypeError, "text_features has dtype"),
    ("tower rows", lambda: fastcl.clip_loss(x(4), x(5), 10.0), ValueError, "text_features has 5 rows"),
    ("m < n default positives", lambda: fastcl.info_nce(x(6), x(4)), ValueError, "need M >= N"),
    ("positive_index range", lambda: fastcl.info_nce(x(), x(), positive_index=torch.tensor([0, 1, 2, 4])), ValueError, "positive_index values"),
    ("positive_index negative", lambda: fastcl.info_nce(x(), x(), positive_index=torch.tensor([0, 1, 2, -1])), ValueError, "positive_index values"),
    ("positive_index dtype", lambda: fastcl.info_nce(x(), x(), positive_index=torch.tensor([0.0, 1, 2, 3])), TypeError, "positive_index must have an integer dtype"),
    ("positive_index length", lambda: fastcl.info_nce(x(), x(), positive_index=torch.tensor([0, 1])), ValueError, "positive_index must have shape (4,)"),
    ("labels length", lambda: fastcl.info_nce(x(), x(), labels=torch.tensor([0, 1])), ValueError, "labels must have shape (4,)"),
    ("key_labels length", lambda: fastcl.info_nce(x(), x(6), labels=torch.zeros(4, dtype=torch.long), key_labels=torch.zeros(4, dtype=torch.long)), ValueError, "key_labels must have shape (6,)"),
    ("key_labels missing", lambda: fastcl.info_nce(x(), x(6), labels=torch.zeros(4, dtype=torch.long)), ValueError, "key_labels is required"),
    ("negative_labels length", lambda: fastcl.info_nce(x(), x(), labels=torch.zeros(4, dtype=torch.long), negatives=x(3), negative_labels=torch.zeros(2, dtype=torch.long)), ValueError, "negative_labels must have shape (3,)"),
    ("labels and positive_index", lambda: fastcl.info_nce(x(), x(), labels=torch.zeros(4, dtype=torch.long), positive_index=torch.arange(4)), ValueError, "either labels or positive_index"),
    ("temperature zero", lambda: fastcl.info_nce(x(), x(), temperature=0.0), ValueError, "temperature must be > 0"),
    ("temperature negative tensor", lambda: fastcl.info_nce(x(), x(), temperature=torch.tensor([0.1, -0.1, 0.1, 0.1])), ValueError, "temperature must be > 0"),
    ("temperature shape", lambda: fastcl.info_nce(x(), x(), temperature=torch.ones(3)), ValueError, "temperature must be a scalar, shape (1,) or shape (4,)"),
    ("scale shape", lambda: fastcl.info_nce(x(), x(), scale=torch.ones(2, 2)), ValueError, "scale must be a scalar"),
    ("scale and temperature", lambda: fastcl.info_nce(x(), x(), temperature=0.2, scale=5.0), ValueError, "either temperature or scale"),
    ("scale and default-valued temperature", lambda: fastcl.info_nce(x(), x(), temperature=0.1, scale=5.0), ValueError, "either temperature or scale"),
    ("symmetric labels", lambda: fastcl.info_nce(x(), x(), labels=torch.zeros(4, dtype=torch.long), symmetric=True), ValueError, "symmetric needs one-to-one"),
    ("symmetric duplicate positives", lambda: fastcl.info_nce(x(), x(), positive_index=torch.tensor([0, 0, 1, 2]), symmetric=True), ValueError, "symmetric needs one-to-one"),
    ("exclude_self default positives", lambda: fastcl.info_nce(x(), x(), exclude_self=True), ValueError, "exclude_self"),
    ("exclude_self own positive", lambda: fastcl.info_nce(x(), x(), exclude_self=True, positive_index=torch.tensor([1, 1, 3, 0])), ValueError, "its own column"),
    ("reduction", lambda: fastcl.info_nce(x(), x(), reduction="avg"), ValueError, "reduction must be one of"),
    ("debias with labels", lambda: fastcl.info_nce(x(), x(), labels=torch.zeros(4, dtype=torch.long), debias=0.1), ValueError, "debias needs one positive per row"),
    ("debias with decoupled", lambda: fastcl.info_nce(x(), x(), decoupled=True, debias=0.1), ValueError, "debias replaces the denominator"),
    ("debias one", lambda: fastcl.info_nce(x(), x(), debias=1.0), ValueError, "debias (tau_plus, the positive class prior) must lie in [0, 1)"),
    ("debias negative", lambda: fastcl.info_nce(x(), x(), debias=-0.1), ValueError, "must lie in [0, 1)"),
    ("debias bool", lambda: fastcl.info_nce(x(), x(), debias=True), TypeError, "debias must be a float"),
    ("backend", lambda: fastcl.info_nce(x(), x(), backend="numpy"), ValueError, "backend must be one of"),
    ("siglip without bias", lambda: fastcl.siglip_loss(x(), x(), 10.0, None), ValueError, "needs logit_bias"),
    ("logit_scale shape", lambda: fastcl.clip_loss(x(), x(), torch.ones(4)), ValueError, "logit_scale must be a scalar"),
    ("logit_bias shape", lambda: fastcl.clip_loss(x(), x(), 10.0, torch.ones(2)), ValueError, "logit_bias must be a scalar"),
    ("supcon rank", lambda: fastcl.supcon(x()), ValueError, "features must be 3-D"),
    ("supcon mode", lambda: fastcl.supcon(torch.randn(4, 2, 3), contrast_mode="some"), ValueError, "contrast_mode must be one of"),
    ("supcon labels", lambda: fastcl.supcon(torch.randn(4, 2, 3), torch.zeros(3, dtype=torch.long)), ValueError, "labels must have shape (4,)"),
    ("nt_xent rows", lambda: fastcl.nt_xent(x(4), x(5)), ValueError, "z2 has 5 rows"),
    ("nt_xent temperature", lambda: fastcl.nt_xent(x(), x(), temperature=-1.0), ValueError, "temperature must be > 0"),
    ("dcl sigma", lambda: fastcl.dcl(x(), x(), weight_sigma=0.0), ValueError, "weight_sigma must be > 0"),
    ("negative_labels without negatives", lambda: fastcl.info_nce(x(), x(), labels=torch.zeros(4, dtype=torch.long), negative_labels=torch.zeros(2, dtype=torch.long)), ValueError, "negative_labels was given without negatives"),
    ("key_labels without labels", lambda: fastcl.info_nce(x(), x(), key_labels=torch.zeros(4, dtype=torch.long)), ValueError, "need labels"),
    ("bool temperature", lambda: fastcl.info_nce(x(), x(), temperature=True), TypeError, "temperature must be a float or a tensor"),
    ("string symmetric", lambda: fastcl.info_nce(x(), x(), symmetric="no"), TypeError, "symmetric must be True or False; got 'no'"),
    ("string exclude_self", lambda: fastcl.info_nce(x(), x(), exclude_self="False"), TypeError, "exclude_self must be True or False"),
    ("int decoupled", lambda: fastcl.info_nce(x(), x(), decoupled=1), TypeError, "decoupled must be True or False"),
    ("string normalize", lambda: fastcl.nt_xent(x(), x(), normalize="False"), TypeError, "normalize must be True or False"),
    ("string normalize dcl", lambda: fastcl.dcl(x(), x(), normalize="False"), TypeError, "normalize must be True or False"),
    ("module temperature and scale", lambda: fastcl.nn.InfoNCELoss(temperature=0.2, scale=10.0), ValueError, "either temperature or scale"),
    ("supcon temperature shape", lambda: fastcl.supcon(torch.randn(4, 2, 3), temperature=torch.ones(2)), ValueError, "temperature must be a scalar (a float, or a tensor of shape () or (1,)); got shape (2,)"),
]


@pytest.mark.parametrize("name,call", [
    ("clip_loss logit_scale", lambda: fastcl.clip_loss(x(), x(), torch.ones(4))),
    ("supcon temperature", lambda: fastcl.supcon(torch.randn(4, 2, 3), temperature=torch.ones(2))),
    ("nt_xent temperature", lambda: fastcl.nt_xent(x(), x(), temperature=torch.ones(4))),
])
def test_scalar_only_messages_offer_only_scalar_shapes(name, call):
    with pytest.raises(ValueError) as info:
        call()
    assert "one per row" not in str(info.value) and "or shape (1,) or shape" not in str(info.value), str(info.value)


@pytest.mark.parametrize("var,value", [("FASTCL_TORCH_BLOCK", "abc"), ("FASTCL_TORCH_BLOCK", "4"),
                                       ("FASTCL_TRITON_BLOCK", "16,16"), ("FASTCL_CUDA_SPLIT", "-2")])
def test_bad_environment_variables_are_named(var, value, monkeypatch):
    from fastcl import _config

    monkeypatch.setenv(var, value)
    parse = {"FASTCL_TORCH_BLOCK": _config.torch_block, "FASTCL_TRITON_BLOCK": _config.triton_block,
             "FASTCL_CUDA_SPLIT": _config.cuda_split}[var]
    with pytest.raises(ValueError, match=f"{var}={value!r}"):
        parse()
    if var == "FASTCL_TORCH_BLOCK":
        with pytest.raises(ValueError, match=var):
            fastcl.info_nce(x(), x(), backend="torch")


def test_empty_queue_is_no_queue():
    q, k = x(), x()
    empty = torch.empty(0, 3)
    assert torch.equal(fastcl.info_nce(q, k, negatives=empty), fastcl.info_nce(q, k))
    labels = torch.tensor([0, 1, 0, 1])
    assert torch.equal(fastcl.info_nce(q, k, labels=labels, negatives=empty, negative_labels=torch.empty(0, dtype=torch.long)),
                       fastcl.info_nce(q, k, labels=labels))
    with pytest.raises(ValueError, match="feature width"):
        fastcl.info_nce(q, k, negatives=torch.empty(0, 5))


def test_half_temperature_is_inverted_in_float32():
    """A float16 temperature tensor: 1/t computed in float32, not rounded to half (off by ~1e-3)."""
    q = torch.nn.functional.normalize(torch.randn(16, 8, dtype=torch.float64), dim=1)
    k = torch.nn.functional.normalize(torch.randn(16, 8, dtype=torch.float64), dim=1)
    t_half = torch.tensor(0.07, dtype=torch.float16)
    got = fastcl.info_nce(q.float(), k.float(), temperature=t_half)
    want = fastcl.info_nce(q, k, temperature=float(t_half))
    assert abs(float(got) - float(want)) <= 2e-5 * abs(float(want)), (float(got), float(want))


@pytest.mark.parametrize("name,call,exc,message", CASES, ids=[c[0] for c in CASES])
def test_bad_input_raises(name, call, exc, message):
    with pytest.raises(exc) as info:
        call()
    assert message in str(info.value), str(info.value)


def test_env_backend_is_validated(monkeypatch):
    monkeypatch.setenv("FASTCL_BACKEND", "fast")
    with pytest.raises(ValueError, match="backend must be one of"):
        fastcl.info_nce(x(), x())


def test_requested_backend_that_cannot_run_says_why():
    # "cuda" on CPU tensors can never run: the message must carry a reason, not just fail
    with pytest.raises(RuntimeError, match=r"backend='cuda' cannot run on cpu: .+"):
        fastcl.info_nce(x(), x(), backend="cuda")


def test_auto_and_env_fall_back_to_torch_on_cpu(monkeypatch):
    q, k = x(), x()
    monkeypatch.delenv("FASTCL_BACKEND", raising=False)
    ref = fastcl.info_nce(q, k, backend="torch")
    assert torch.equal(fastcl.info_nce(q, k), ref)
    monkeypatch.setenv("FASTCL_BACKEND", "torch")
    assert torch.equal(fastcl.info_nce(q, k), ref)


def test_devices_must_match():
    meta = torch.randn(4, 3, device="meta")
    with pytest.raises(ValueError, match="key is on meta but query is on cpu"):
        fastcl.info_nce(x(), meta)
    with pytest.raises(ValueError, match="labels is on meta"):
        fastcl.info_nce(x(), x(), labels=torch.zeros(4, dtype=torch.long, device="meta"))


def test_build_info():
    info = fastcl.build_info()
    for key in ("version", "torch", "triton", "cuda_extension", "cuda_archs", "backends"):
        assert key in info
    assert info["version"] == fastcl.__version__
    assert "torch" in info["backends"]
    assert isinstance(info["cuda_extension"], bool) and isinstance(info["cuda_archs"], list)
    from fastcl.backends import _cpu_epilogues

    # the CPU epilogues: reported as they import, with a reason exactly when they do not
    assert info["cpu_extension"] is (_cpu_epilogues.NOT_BUILT_BECAUSE is None)
    assert (info["cpu_extension_reason"] is None) is info["cpu_extension"]
