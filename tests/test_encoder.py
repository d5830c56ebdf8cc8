"""Embedders: pooling, padding invariance, joint vs late fusion."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from mmret.data.processor import Processor, ProcessorConfig
from mmret.models import qwen2_vl
from mmret.models.encoder import Encoder, EncoderConfig, last_token_pool, mean_pool
from mmret.models.qwen2_vl.presets import hf_config
from mmret.models.qwen2_vl.processor_files import write_processor_files


@pytest.fixture(scope="module")
def processor(tmp_path_factory) -> Processor:
    d = tmp_path_factory.mktemp("proc")
    write_processor_files(d)
    return Processor(d, ProcessorConfig(max_pixels=16 * 28 * 28))


@pytest.fixture(scope="module")
def backbone():
    cfg = qwen2_vl.Qwen2VLConfig.from_hf_dict(hf_config("tiny"))
    return qwen2_vl.create(cfg, seed=3)


def picture(seed: int, size=(84, 56)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def examples(processor):
    return [
        processor(text="A red circle on the left.", image=picture(0), instruction="Find the matching image."),
        processor(text="Only words here, nothing else."),
        processor(image=picture(1, (56, 112))),
    ]


def collate(processor, examples, side="right", length=96):
    return processor.collate(examples, max_length=length, max_patches=4 * 64, max_images=4, padding_side=side)


def test_pooling_functions_match_numpy():
    rng = np.random.default_rng(0)
    h = rng.standard_normal((2, 5, 3)).astype(np.float32)
    m = np.array([[1, 1, 0, 1, 0], [0, 0, 1, 1, 1]])
    np.testing.assert_allclose(mean_pool(jnp.asarray(h), jnp.asarray(m))[0], h[0, [0, 1, 3]].mean(0), rtol=1e-6)
    attn = np.array([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1]])  # right-, left-padded
    np.testing.assert_array_equal(last_token_pool(jnp.asarray(h), jnp.asarray(attn)), h[[0, 1], [2, 4]])


@pytest.mark.parametrize("pooling", ["mean", "last"])
@pytest.mark.parametrize("fusion", ["joint", "late"])
def test_embedding_does_not_depend_on_padding_or_batch_mates(backbone, processor, examples, pooling, fusion):
    enc = Encoder(backbone, EncoderConfig(pooling=pooling, fusion=fusion))
    right = np.asarray(enc(collate(processor, examples, "right")))
    left = np.asarray(enc(collate(processor, examples, "left", length=120)))
    alone = np.asarray(enc(collate(processor, examples[:1])))
    assert right.shape == (3, 64)
    np.testing.assert_allclose(np.linalg.norm(right, axis=-1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(right, left, atol=2e-5)
    np.testing.assert_allclose(right[:1], alone, atol=2e-5)


def test_late_fusion_is_the_sum_of_a_text_only_pass_and_the_image_features(backbone, processor, examples):
    enc = Encoder(backbone, EncoderConfig(fusion="late", pooling="mean"))
    batch = collate(processor, examples)
    got = np.asarray(enc(batch))
    # Reference: the same sequence with the vision tokens physically removed, and the image's merged
    # vision features averaged.
    cfg = backbone.cfg
    vision = {cfg.image_token_id, cfg.vision_start_token_id, cfg.vision_end_token_id}
    ex = examples[0]
    keep = np.array([t not in vision for t in ex.input_ids])
    ids, pool = ex.input_ids[keep][None], ex.pool_mask[keep][None]
    hidden = backbone(ids, np.ones_like(ids), causal=False).last_hidden_state
    text = np.asarray(mean_pool(hidden, jnp.asarray(pool)))[0]
    image = np.asarray(backbone.visual(jnp.asarray(ex.pixel_values), jnp.asarray(ex.image_grid_thw))).mean(0)
    expected = text / np.linalg.norm(text) + image / np.linalg.norm(image)
    np.testing.assert_allclose(got[0], expected / np.linalg.norm(expected), atol=2e-5)
    # Text-only and image-only inputs keep one leg.
    only_text = np.asarray(enc(collate(processor, examples[1:2])))[0]
    img = np.asarray(backbone.visual(jnp.asarray(examples[2].pixel_values), jnp.asarray(examples[2].image_grid_thw)))
    only_image = np.asarray(enc(collate(processor, examples[2:3])))[0]
    np.testing.assert_allclose(only_image, img.mean(0) / np.linalg.norm(img.mean(0)), atol=2e-5)
    assert np.isclose(np.linalg.norm(only_text), 1.0)


def test_joint_and_late_fusion_differ_and_attention_mode_matters(backbone, processor, examples):
    batch = collate(processor, examples)
    joint = np.asarray(Encoder(backbone, EncoderConfig(fusion="joint"))(batch))
    late = np.asarray(Encoder(backbone, EncoderConfig(fusion="late"))(batch))
    causal = np.asarray(Encoder(backbone, EncoderConfig(attention="causal"))(batch))
    assert np.abs(joint[0] - late[0]).max() > 1e-3
    assert np.abs(joint[0] - causal[0]).max() > 1e-3


def test_bad_encoder_option_is_named():
    with pytest.raises(ValueError, match="encoder.pooling"):
        EncoderConfig(pooling="cls")
