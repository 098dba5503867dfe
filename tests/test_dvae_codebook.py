"""Codebook loading: HF folder, DALL-E encoder.pkl (restricted unpickling, key rename), seeded random; pixels."""

from __future__ import annotations

import io
import sys
import types
from collections import OrderedDict

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from transformers import FlavaImageCodebook, FlavaImageCodebookConfig

from pmd_pipeline.errors import PmdError
from pmd_pipeline.tokens.codebook import codebook_identity, dalle_to_flava_keys, files_identity, load_codebook
from pmd_pipeline.tokens.encoder import BadImage, DvaeTokenizer, agreement, encoder_pixels, int8_engine, token_problem

SMALL = {"hidden_size": 8, "num_blocks_per_group": 1}  # plumbing tests: real layout, 8192 codes, few weights


def small_hf_folder(path, seed=0):
    torch.manual_seed(seed)
    FlavaImageCodebook(FlavaImageCodebookConfig(**SMALL)).save_pretrained(path)
    return path


# --- a pickle that looks like DALL-E's: dall_e.encoder.Encoder / EncoderBlock, dall_e.utils.Conv2d modules ---


class Conv2d(nn.Module):
    def __init__(self, n_in, n_out, kw):
        super().__init__()
        self.n_in, self.n_out, self.kw, self.use_float16 = n_in, n_out, kw, True
        self.w = nn.Parameter(torch.randn(n_out, n_in, kw, kw) / (n_in * kw * kw) ** 0.5)
        self.b = nn.Parameter(torch.randn(n_out) * 0.01)

    def forward(self, x):
        return nn.functional.conv2d(x, self.w, self.b, padding=(self.kw - 1) // 2)


class EncoderBlock(nn.Module):
    def __init__(self, n_in, n_out, n_layers):
        super().__init__()
        n_hid = n_out // 4
        self.post_gain = 1 / n_layers**2
        self.id_path = Conv2d(n_in, n_out, 1) if n_in != n_out else nn.Identity()
        self.res_path = nn.Sequential(
            OrderedDict(
                [
                    ("relu_1", nn.ReLU()),
                    ("conv_1", Conv2d(n_in, n_hid, 3)),
                    ("relu_2", nn.ReLU()),
                    ("conv_2", Conv2d(n_hid, n_hid, 3)),
                    ("relu_3", nn.ReLU()),
                    ("conv_3", Conv2d(n_hid, n_hid, 3)),
                    ("relu_4", nn.ReLU()),
                    ("conv_4", Conv2d(n_hid, n_out, 1)),
                ]
            )
        )

    def forward(self, x):
        return self.id_path(x) + self.post_gain * self.res_path(x)


class Encoder(nn.Module):
    """DALL-E's dall_e/encoder.py module tree with n_hid and blocks per group as parameters."""

    def __init__(self, n_hid=8, n_blk=1, vocab_size=8192):
        super().__init__()
        n_layers = 4 * n_blk

        def group(n_in, n_out, pool=True):
            blocks = [
                (f"block_{i + 1}", EncoderBlock(n_in if i == 0 else n_out, n_out, n_layers)) for i in range(n_blk)
            ]
            return nn.Sequential(OrderedDict(blocks + ([("pool", nn.MaxPool2d(kernel_size=2))] if pool else [])))

        self.blocks = nn.Sequential(
            OrderedDict(
                [
                    ("input", Conv2d(3, n_hid, 7)),
                    ("group_1", group(n_hid, n_hid)),
                    ("group_2", group(n_hid, 2 * n_hid)),
                    ("group_3", group(2 * n_hid, 4 * n_hid)),
                    ("group_4", group(4 * n_hid, 8 * n_hid, pool=False)),
                    (
                        "output",
                        nn.Sequential(OrderedDict([("relu", nn.ReLU()), ("conv", Conv2d(8 * n_hid, vocab_size, 1))])),
                    ),
                ]
            )
        )

    def forward(self, x):
        return self.blocks(x)


def save_dalle_pickle(path, encoder):
    """torch.save the module tree under DALL-E's module names, as DALL-E's encoder.pkl was made."""
    fake = {"dall_e": types.ModuleType("dall_e"), "dall_e.encoder": types.ModuleType("dall_e.encoder")}
    fake["dall_e.utils"] = types.ModuleType("dall_e.utils")
    for cls, module in ((Encoder, "dall_e.encoder"), (EncoderBlock, "dall_e.encoder"), (Conv2d, "dall_e.utils")):
        cls.__module__ = module
        setattr(fake[module], cls.__name__, cls)
    sys.modules.update(fake)
    try:
        torch.save(encoder, path)
    finally:
        for name in fake:
            sys.modules.pop(name)
        for cls in (Encoder, EncoderBlock, Conv2d):
            cls.__module__ = __name__


def pixels(n, seed=0):
    return np.random.default_rng(seed).uniform(0.1, 0.9, (n, 3, 112, 112)).astype(np.float32)


def test_key_rename_matches_flava_layout():
    state = {
        "blocks.input.w": torch.zeros(1),
        "blocks.group_1.block_1.res_path.conv_1.b": torch.zeros(1),
        "blocks.group_4.block_1.id_path.w": torch.zeros(1, dtype=torch.float16),
        "blocks.output.conv.w": torch.zeros(1),
    }
    renamed = dalle_to_flava_keys(state)
    assert list(renamed) == [
        "blocks.input.weight",
        "blocks.group_1.group.block_1.res_path.path.conv_1.bias",
        "blocks.group_4.group.block_1.id_path.weight",
        "blocks.output.conv.weight",
    ]
    assert all(v.dtype == torch.float32 for v in renamed.values())
    real = set(FlavaImageCodebook(FlavaImageCodebookConfig(**SMALL)).state_dict())
    dalle = set(dalle_to_flava_keys(Encoder().state_dict()))
    assert dalle == real


def test_dalle_pickle_loads_through_the_real_loader_and_gives_the_same_logits(tmp_path, monkeypatch):
    torch.manual_seed(1)
    encoder = Encoder().eval()
    save_dalle_pickle(tmp_path / "encoder.pkl", encoder)
    small = lambda: FlavaImageCodebookConfig(**SMALL)  # noqa: E731
    monkeypatch.setattr("transformers.FlavaImageCodebookConfig", small)
    codebook = load_codebook(tmp_path / "encoder.pkl")
    assert codebook.identity == files_identity([tmp_path / "encoder.pkl"]) and not codebook.random
    x = torch.from_numpy(pixels(2))
    with torch.no_grad():
        torch.testing.assert_close(codebook.model(x), encoder(x), rtol=1e-4, atol=1e-4)


def test_dalle_pickle_naming_any_other_class_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"blocks.input.w": torch.zeros(1), "x": Evil()}, tmp_path / "encoder.pkl")
    with pytest.raises(PmdError, match="refusing to load"):
        load_codebook(tmp_path / "encoder.pkl")
    (tmp_path / "junk.pkl").write_bytes(b"not a checkpoint")
    with pytest.raises(PmdError, match="neither an HF folder"):
        load_codebook(tmp_path / "junk.pkl")


def test_hf_folder_loads_with_its_weights_hash(tmp_path):
    folder = small_hf_folder(tmp_path / "codebook")
    codebook = load_codebook(folder)
    assert codebook.identity.startswith("sha256:") and codebook.identity == codebook_identity(folder)
    reference = FlavaImageCodebook.from_pretrained(folder)
    x = torch.from_numpy(pixels(1))
    with torch.no_grad():
        assert torch.equal(codebook.model(x), reference(x))
    with pytest.raises(PmdError, match="not a FlavaImageCodebook folder"):
        load_codebook(tmp_path)
    with pytest.raises(PmdError, match="not found"):
        load_codebook(tmp_path / "missing")


def test_random_codebook_is_seeded_and_real_architecture():
    a, b, c = load_codebook(None, seed=3), load_codebook("", seed=3), load_codebook(None, seed=4)
    assert a.identity == "random, seed 3" and a.random
    assert sum(p.numel() for p in a.model.parameters()) == 53_786_240
    sa, sb, sc = a.model.state_dict(), b.model.state_dict(), c.model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["blocks.input.weight"], sc["blocks.input.weight"])


def test_real_architecture_tokens_shape_and_range():
    tokenizer = DvaeTokenizer(load_codebook(None, seed=0).model, "fp32", "cpu")
    fp32 = tokenizer.tokens(pixels(2))
    assert fp32.shape == (2, 14, 14) and fp32.dtype == np.uint16 and fp32.max() < 8192
    assert token_problem(fp32[0]) is None
    assert agreement(fp32, fp32) == 1.0 and agreement(fp32, fp32 ^ 1) == 0.0


def test_bad_token_arrays_have_reasons():
    assert token_problem(np.zeros((14, 14), np.uint16)) is None
    assert token_problem(np.zeros((7, 7), np.uint16)) == "dvae_bad_shape"
    assert token_problem(np.zeros((14, 14), np.int64)) == "dvae_bad_dtype"
    assert token_problem(np.full((14, 14), 8192, np.uint16)) == "dvae_out_of_range"


def jpeg(size, color=(200, 30, 30)):
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, "JPEG", quality=95)
    return buffer.getvalue()


def test_encoder_pixels_are_lanczos_112_and_mapped():
    x = encoder_pixels(jpeg((224, 224), (255, 0, 0)))
    assert x.shape == (3, 112, 112) and x.dtype == np.float32
    assert abs(x[0].mean() - 0.9) < 0.01 and abs(x[1].mean() - 0.1) < 0.01  # map_pixels: 0.8 x + 0.1
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (224, 224, 3), dtype=np.uint8)).save(buffer, "JPEG")
    src = Image.open(buffer).convert("RGB").resize((112, 112), Image.Resampling.LANCZOS)
    expected = np.asarray(src, np.float32).transpose(2, 0, 1) / 255 * 0.8 + 0.1
    np.testing.assert_allclose(encoder_pixels(buffer.getvalue()), expected, rtol=1e-6)
    with pytest.raises(BadImage) as err:
        encoder_pixels(jpeg((224, 200)))
    assert err.value.reason == "dvae_image_not_square"
    with pytest.raises(BadImage) as err:
        encoder_pixels(b"<html>")
    assert err.value.reason == "dvae_decode_error"


def test_auto_precision_is_fp32_on_cpus_and_unknown_precisions_are_refused():
    model = FlavaImageCodebook(FlavaImageCodebookConfig(**SMALL))
    assert DvaeTokenizer(model, "auto", "cpu").precision == "fp32"  # bf16 measured slower on CPUs without AMX
    with pytest.raises(PmdError, match="precision 'fp16' is not one of"):
        DvaeTokenizer(model, "fp16", "cpu")


def test_int8_tokens_are_valid_deterministic_and_their_agreement_is_measured_on_held_out_images():
    torch.manual_seed(0)
    model = FlavaImageCodebook(FlavaImageCodebookConfig(**SMALL)).eval()
    calibration = pixels(6, seed=1)
    a = DvaeTokenizer(model, "int8", "cpu", calibration=calibration)
    b = DvaeTokenizer(model, "int8", "cpu", calibration=calibration)
    images = pixels(3, seed=2)
    tokens = a.tokens(images)
    assert a.precision == "int8" and tokens.shape == (3, 14, 14) and tokens.dtype == np.uint16
    assert all(token_problem(grid) is None for grid in tokens)
    assert np.array_equal(tokens, b.tokens(images))  # same calibration images -> same tokens (resume is exact)
    assert not any(isinstance(m, nn.Conv2d) and type(m) is nn.Conv2d for m in a.model.modules())  # really int8
    held_out = calibration[3:]  # the second half is only compared, never fitted
    exact = DvaeTokenizer(model, "fp32", "cpu").tokens(held_out)
    assert a.int8_agreement == pytest.approx(agreement(a.tokens(held_out), exact))
    assert DvaeTokenizer(model, "fp32", "cpu").int8_agreement is None


def test_int8_from_another_tokenizers_ranges_is_the_same_model():
    """A streaming build's actors share one calibration: the ranges rebuild the very model (equal logits), and
    ranges of another architecture are refused."""
    torch.manual_seed(0)
    model = FlavaImageCodebook(FlavaImageCodebookConfig(**SMALL)).eval()
    calibrated = DvaeTokenizer(model, "int8", "cpu", calibration=pixels(6, seed=1))
    shared = DvaeTokenizer(model, "int8", "cpu")
    shared.calibrate_from(calibrated.int8_ranges, calibrated.int8_agreement)
    x = torch.from_numpy(pixels(3, seed=2))
    with torch.inference_mode(), int8_engine():
        assert torch.equal(calibrated.model(x), shared.model(x))
    assert shared.int8_agreement == calibrated.int8_agreement and not shared.needs_calibration
    other = FlavaImageCodebook(FlavaImageCodebookConfig(**{**SMALL, "num_blocks_per_group": 2})).eval()
    with pytest.raises(ValueError, match="int8 ranges for another model"):
        DvaeTokenizer(other, "int8", "cpu").calibrate_from(calibrated.int8_ranges, 1.0)


def test_int8_needs_calibration_images():
    model = FlavaImageCodebook(FlavaImageCodebookConfig(**SMALL))
    with pytest.raises(PmdError, match="at least 2 calibration images"):
        DvaeTokenizer(model, "int8", "cpu", calibration=pixels(1))
