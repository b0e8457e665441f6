"""Token pooling (`load_teacher(..., token_grid=G)`): the block means, the layouts of both towers, and the
fingerprint that keeps features of two grids apart while leaving the default's exactly as it was."""

from __future__ import annotations

import json
from pathlib import Path

import open_clip
import pytest
import torch

from vlkd.data.feature_store import FeatureStore
from vlkd.data.feature_writer import Encoding, extract_features
from vlkd.errors import VlkdError
from vlkd.io import sha256_file
from vlkd.models.teacher import load_teacher, pool_token_grid, save_checkpoint

TEXT_CFG = {"context_length": 16, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1}
# Both towers with a 4 x 4 grid of image tokens: 32-pixel images in 8-pixel patches; the ResNet downsamples 32x.
CONFIGS = {
    "vlkd-tokens-vit": {"embed_dim": 16, "text_cfg": TEXT_CFG,
                      "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "head_width": 16, "layers": 1}},
    "vlkd-tokens-resnet": {"embed_dim": 16, "text_cfg": TEXT_CFG,
                         "vision_cfg": {"image_size": 128, "layers": [1, 1, 1, 1], "width": 8}},
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, str]:
    """{model name: checkpoint file} of randomly initialised towers, saved the way the teacher stage saves."""
    folder = tmp_path_factory.mktemp("teachers")
    files = {}
    for name, config in CONFIGS.items():
        (folder / f"{name}.json").write_text(json.dumps(config))
        open_clip.add_model_config(folder / f"{name}.json")  # create_model knows models by registered name
        torch.manual_seed(0)
        model = open_clip.create_model(name, pretrained=None)
        files[name] = str(save_checkpoint(model, name, config, folder / name))
    return files


def images(name: str) -> torch.Tensor:
    side = CONFIGS[name]["vision_cfg"]["image_size"]
    return torch.randn(2, 3, side, side, generator=torch.Generator().manual_seed(3))


@torch.no_grad()
def encode(name: str, checkpoint: str, **options) -> tuple[torch.Tensor, torch.Tensor]:
    return load_teacher(name, checkpoint, image_tokens=True, **options).model.encode_image(images(name))


def test_each_pooled_token_is_the_mean_of_its_block_and_the_leading_token_stays_first():
    # A 4 x 4 grid, row-major, cell (r, c) = 4r + c in channel 0 and its negative in channel 1, after one
    # leading token (100, -100): the 2 x 2 blocks average {0,1,4,5}, {2,3,6,7}, {8,9,12,13}, {10,11,14,15}.
    cells = torch.arange(16.0)
    tokens = torch.cat([torch.tensor([[100.0, -100.0]]), torch.stack([cells, -cells], 1)])[None]
    want = torch.tensor([[100.0, -100.0], [2.5, -2.5], [4.5, -4.5], [10.5, -10.5], [12.5, -12.5]])
    torch.testing.assert_close(pool_token_grid(tokens, (4, 4), 2)[0], want)
    # Without a leading token (a ViT's patches), and to one token: the grid's mean.
    torch.testing.assert_close(pool_token_grid(tokens[:, 1:], (4, 4), 2)[0], want[1:])
    torch.testing.assert_close(pool_token_grid(tokens[:, 1:], (4, 4), 1)[0], torch.tensor([[7.5, -7.5]]))


def test_a_grid_that_does_not_divide_is_pooled_in_overlapping_blocks():
    # 3 x 3 cells 0..8 to 2 x 2: adaptive pooling takes rows and columns {0,1} and {1,2}.
    tokens = torch.arange(9.0).reshape(1, 9, 1)
    want = torch.tensor([[2.0], [3.0], [5.0], [6.0]])  # means of {0,1,3,4}, {1,2,4,5}, {3,4,6,7}, {4,5,7,8}
    torch.testing.assert_close(pool_token_grid(tokens, (3, 3), 2)[0], want)


def test_tokens_that_are_not_the_grid_are_refused():
    for count in (15, 18):  # fewer than the grid, or more than one leading token
        with pytest.raises(VlkdError, match=f"{count} image tokens are not a 4 x 4 grid"):
            pool_token_grid(torch.zeros(1, count, 2), (4, 4), 2)


@pytest.mark.parametrize(("name", "leading"), [("vlkd-tokens-vit", 0), ("vlkd-tokens-resnet", 1)])
def test_the_teachers_tokens_are_pooled_to_the_grid(checkpoints, name, leading):
    pooled, tokens = encode(name, checkpoints[name])
    assert tokens.shape[1] == leading + 16  # the 4 x 4 grid, after the ResNet's pooled token
    grid_pooled, grid_tokens = encode(name, checkpoints[name], token_grid=2)
    assert grid_tokens.shape == (2, leading + 4, tokens.shape[2])
    torch.testing.assert_close(grid_pooled, pooled)  # the embedding is not touched
    torch.testing.assert_close(grid_tokens[:, :leading], tokens[:, :leading])
    # Block (i, j) of the 4 x 4 grid by hand: rows 2i..2i+1, columns 2j..2j+1.
    cells = tokens[:, leading:].reshape(2, 4, 4, -1)
    blocks = torch.stack([cells[:, 2 * i:2 * i + 2, 2 * j:2 * j + 2].mean((1, 2)) for i in (0, 1) for j in (0, 1)], 1)
    torch.testing.assert_close(grid_tokens[:, leading:], blocks, rtol=1e-5, atol=1e-6)
    _, one = encode(name, checkpoints[name], token_grid=1)
    torch.testing.assert_close(one[:, leading:], tokens[:, leading:].mean(1, keepdim=True), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", CONFIGS)
def test_the_fingerprint_names_the_grid_and_is_unchanged_without_one(checkpoints, name):
    checkpoint = checkpoints[name]
    before = {"model": name, "weights_sha256": sha256_file(Path(checkpoint)),
              "open_clip_version": open_clip.__version__}
    # The default, and a grid equal to the model's own (the same features), give exactly the dict that feature
    # files and students recorded before token_grid existed.
    for options in ({}, {"image_tokens": True}, {"image_tokens": True, "token_grid": 4}):
        assert load_teacher(name, checkpoint, **options).fingerprint.as_dict() == before
    grid = load_teacher(name, checkpoint, image_tokens=True, token_grid=2).fingerprint.as_dict()
    assert grid == {**before, "token_grid": 2}
    # Recorded without tokens too: a `prefix: pooled` student's evaluation loads no tokens but must match the
    # files made with the grid.
    assert load_teacher(name, checkpoint, token_grid=2).fingerprint.as_dict() == grid
    assert load_teacher(name, checkpoint, token_grid=1).fingerprint.as_dict() != grid


@pytest.mark.parametrize(("token_grid", "message"), [
    (0, "token_grid must be a whole number of at least 1"),
    (True, "token_grid must be a whole number of at least 1"),
    (2.0, "token_grid must be a whole number of at least 1"),
    (5, "token_grid 5 is larger than the 4 x 4 grid of image tokens of model 'vlkd-tokens-vit'"),
])
def test_a_bad_token_grid_is_one_clear_line(checkpoints, token_grid, message):
    with pytest.raises(VlkdError, match=message) as raised:
        load_teacher("vlkd-tokens-vit", checkpoints["vlkd-tokens-vit"], image_tokens=True, token_grid=token_grid)
    assert "\n" not in str(raised.value)


def test_features_of_a_grid_are_stored_pooled_and_never_mixed_with_the_full_layout(tiny_world_shards, checkpoints,
                                                                                  tmp_path):
    _, shards = tiny_world_shards
    name, output = "vlkd-tokens-vit", tmp_path / "features"
    params = Encoding(batch_size=4, num_workers=0, device="cpu", image_tokens=True, precision="auto")
    grid = load_teacher(name, checkpoints[name], image_tokens=True, token_grid=2)
    extract_features(shards, output, grid, params)
    store = FeatureStore(output, expected_teacher=grid.fingerprint.as_dict())
    batch = next(store.iter_batches(4, columns=["image_tokens"]))
    assert batch["image_tokens"].shape == (4, 4, CONFIGS[name]["vision_cfg"]["width"])  # 2 x 2, not 4 x 4
    assert store.metadata["teacher"]["token_grid"] == 2
    full = load_teacher(name, checkpoints[name], image_tokens=True)
    with pytest.raises(VlkdError, match="made by another teacher"):
        extract_features(shards, output, full, params)
    with pytest.raises(VlkdError, match="not the expected"):
        FeatureStore(output, expected_teacher=full.fingerprint.as_dict())
