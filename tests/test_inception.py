"""The FID Inception port against pytorch-fid's InceptionV3 under identical random weights (no download)."""

from unittest import mock

import pytest
import pytorch_fid.inception as pytorch_fid_inception  # the reference, from the test extra
import torch

from ddpm_curriculum.errors import UserError
from ddpm_curriculum.metrics import inception as inc


@pytest.fixture(scope="module")
def weights():
    return inc.random_state_dict(seed=0)


@pytest.fixture(scope="module")
def reference(weights):
    """pytorch-fid's network with all four output blocks; its weight download is replaced by our state dict,
    which it loads with strict=True (so the key sets are equal)."""
    with mock.patch.object(pytorch_fid_inception, "load_state_dict_from_url", return_value=weights):
        return pytorch_fid_inception.InceptionV3(output_blocks=[0, 1, 2, 3]).eval()


@pytest.mark.slow
def test_state_dict_keys_equal_pytorch_fid(weights):
    with mock.patch.object(pytorch_fid_inception, "load_state_dict_from_url", return_value=weights):
        theirs = pytorch_fid_inception.fid_inception_v3().state_dict()
    ours = inc.FIDInceptionV3().state_dict()
    assert set(ours) == set(theirs)
    assert all(ours[k].shape == theirs[k].shape for k in ours)
    # the published file: 472 tensors once BatchNorm's num_batches_tracked counters are left out
    assert sum(not k.endswith("num_batches_tracked") for k in ours) == 472


@pytest.mark.slow
@pytest.mark.parametrize("size", [(33, 21), (17, 299)])
def test_features_equal_pytorch_fid_for_odd_sizes(weights, reference, size):
    x = torch.rand(2, 3, *size, generator=torch.Generator().manual_seed(sum(size)))
    with torch.no_grad():
        theirs = [f.mean(dim=(2, 3)) for f in reference(x)]  # their get_activations pools to 1×1
        plain = inc.FIDInceptionV3()
        plain.load_state_dict(weights)
        ours = plain.eval()(x, dims=inc.BLOCK_DIMS)
    for dim, ref in zip(inc.BLOCK_DIMS, theirs, strict=True):
        assert ref.shape == (2, dim) and ref.abs().mean() > 1e-2  # non-degenerate activations
        torch.testing.assert_close(ours[dim], ref, rtol=1e-5, atol=1e-6, msg=f"{dim}-d features differ")


@pytest.mark.slow
def test_loaded_model_matches_and_fills_missing_batch_counters(tmp_path, weights, reference):
    # the published file has no num_batches_tracked entries; loading must still be strict and succeed
    path = tmp_path / inc.FID_WEIGHTS_NAME
    torch.save({k: v for k, v in weights.items() if not k.endswith("num_batches_tracked")}, path)
    model = inc.load_fid_inception(path)  # channels_last on CPU: other conv kernels, same math
    x = torch.rand(2, 3, 31, 31, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model(x, dims=(2048,))[2048]
        theirs = reference(x)[3].flatten(1)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)


def test_wrong_weight_file_is_a_clear_error(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"fc.weight": torch.zeros(3, 3)}, path)
    with pytest.raises(UserError, match="is not the FID Inception weight file"):
        inc.load_fid_inception(path)
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="cannot read Inception weights"):
        inc.load_fid_inception(tmp_path / "junk.pth")


def test_weight_lookup_order(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    with pytest.raises(UserError, match="does not exist"):
        inc.find_weights(tmp_path / "nope.pth")
    with pytest.raises(UserError) as err:
        inc.find_weights(None, download=False)
    msg = str(err.value)
    assert inc.FID_WEIGHTS_NAME in msg and str(tmp_path / "th" / "hub" / "checkpoints") in msg
    cached = tmp_path / "th" / "hub" / "checkpoints" / inc.FID_WEIGHTS_NAME
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"x")
    assert inc.find_weights(None, download=False) == cached
    explicit = tmp_path / "mine.pth"
    explicit.write_bytes(b"x")
    assert inc.find_weights(explicit) == explicit
