"""VLKD distillation with real tiny models: a BART and a BPE tokenizer made here, features from a random
open_clip teacher on real shards."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from click.testing import CliRunner
from conftest import TEST_MODEL, make_random_teacher, make_tiny_plm
from pydantic import ValidationError
from safetensors.torch import load_file

from vlkd.cli import main
from vlkd.config import DistillParams
from vlkd.data.feature_store import FeatureStore
from vlkd.data.feature_writer import Encoding, extract_features
from vlkd.data.noising import infill_spans
from vlkd.distill import objective, train
from vlkd.distill.data import FeatureBatches
from vlkd.distill.retention import RetentionBatches
from vlkd.distill.rows import continuation_rows
from vlkd.errors import VlkdError
from vlkd.io import sha256_file
from vlkd.models.losses import ItclLoss, noisy_batch, ttdm_loss
from vlkd.models.student import Student, StudentConfig
from vlkd.models.teacher import load_teacher
from vlkd.training import Optimization

TEACHER = {"model": "t", "weights_sha256": "0" * 64, "open_clip_version": "x"}


@pytest.fixture(autouse=True)
def own_params_file(tmp_path, monkeypatch):
    """The CLI finds params.yaml from the working directory: every test runs in its own folder with its own,
    so the project's params.yaml (the embedded demo's choices) does not leak into these tests."""
    (tmp_path / "params.yaml").write_text("distill:\n  device: cpu\n")
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="module")
def setup(tiny_world_shards, random_teacher, tmp_path_factory):
    """(features folder, language-model folder, teacher) shared by the module; tests copy what they change."""
    root = tmp_path_factory.mktemp("distill")
    teacher = load_teacher(TEST_MODEL, str(random_teacher), image_tokens=True)
    extract_features(tiny_world_shards[1], root / "features", teacher,
                     Encoding(batch_size=8, num_workers=0, device="cpu", image_tokens=True, precision="auto"))
    captions = [c for batch in FeatureStore(root / "features").iter_batches(64) for c in batch["caption"]]
    return root / "features", make_tiny_plm(root / "plm", captions), random_teacher


def params(setup, tmp_path, **changes) -> DistillParams:
    features, plm, _ = setup
    base = dict(features=features, kept=None, plm=plm, output=tmp_path / "student", checkpoints=tmp_path / "ckpt",
                plots=tmp_path / "plots", epochs=2, batch_size=6, lr=3e-3, warmup_steps=2,
                checkpoint_every=2, device="cpu")
    return DistillParams(**{**base, **changes})


# -- losses on inputs whose value is known -----------------------------------------------------------------
def test_ttdm_is_zero_for_identical_embeddings_and_grows_with_distance():
    clip = F.normalize(torch.randn(4, 8), dim=-1)
    assert ttdm_loss(clip.clone(), clip, "mse").item() == 0
    assert ttdm_loss(clip.clone(), clip, "cosine").item() == pytest.approx(0, abs=1e-6)
    assert ttdm_loss(-clip, clip, "mse").item() == pytest.approx(4.0)  # |2v|^2 for unit v
    assert ttdm_loss(-clip, clip, "cosine").item() == pytest.approx(2.0)


def test_itcl_is_minimal_for_a_perfectly_aligned_batch_and_matches_cross_entropy():
    loss = ItclLoss()
    aligned = torch.eye(4)
    assert loss(aligned, aligned, torch.tensor(math.log(100.0))).item() == pytest.approx(0, abs=1e-6)
    image, text = torch.randn(5, 8), torch.randn(5, 8)
    scale = torch.tensor(math.log(1 / 0.07))
    logits = scale.exp() * F.normalize(image, dim=-1) @ F.normalize(text, dim=-1).T
    expected = (F.cross_entropy(logits, torch.arange(5)) + F.cross_entropy(logits.T, torch.arange(5))) / 2
    assert loss(image, text, scale).item() == pytest.approx(expected.item(), rel=1e-5)
    shuffled = loss(aligned, aligned[[1, 0, 3, 2]], torch.tensor(math.log(100.0)))
    assert shuffled.item() > 10


def test_span_masking_statistics():
    rng = np.random.default_rng(0)
    tokens = list(range(10, 110))
    masked_share, masks = [], 0
    for _ in range(300):
        noisy = infill_spans(tokens, 0, 0.3, 3.0, rng)
        kept = [t for t in noisy if t != 0]
        assert kept == sorted(kept)  # the order of the unmasked tokens is kept
        masked_share.append(1 - len(kept) / len(tokens))
        masks += noisy.count(0)
        assert all(not (a == 0 and b == 0) for a, b in zip(noisy, noisy[1:], strict=False))  # one mask per span
    assert np.mean(masked_share) == pytest.approx(0.3, abs=0.005)
    mean_span = np.mean(masked_share) * len(tokens) * 300 / masks
    assert 2.0 < mean_span < 4.0  # Poisson(3) spans, some merged, some zero-length inserts
    assert infill_spans(tokens, 0, 1.0, 3.0, rng) == [0]
    assert infill_spans(tokens, 0, 0.0, 3.0, rng) == tokens


def test_whole_caption_share_masks_that_share_of_captions_entirely(setup):
    tokenizer = Student.from_language_model(setup[1], StudentConfig(teacher=TEACHER, embed_dim=8)).tokenizer
    captions = [tokenizer(f"a red circle number {i} on the left of a gray background").input_ids for i in range(400)]
    mask = tokenizer.mask_token_id
    batch = noisy_batch(captions, tokenizer, 0.3, 3.0, np.random.default_rng(0), whole_share=0.25)
    whole = [row[:3].tolist() == [captions[0][0], mask, captions[0][-1]] for row in batch["input_ids"]]
    assert 0.18 < np.mean(whole) < 0.32
    paper = noisy_batch(captions, tokenizer, 0.3, 3.0, np.random.default_rng(0))
    assert torch.equal(paper["input_ids"], noisy_batch(captions, tokenizer, 0.3, 3.0, np.random.default_rng(0),
                                                       whole_share=0.0)["input_ids"])  # same noise as before


def test_whole_caption_keep_leaves_opening_tokens_before_the_one_mask(setup):
    tokenizer = Student.from_language_model(setup[1], StudentConfig(teacher=TEACHER, embed_dim=8)).tokenizer
    caption = tokenizer("there is a red circle on the left").input_ids
    mask = tokenizer.mask_token_id
    one_token = [caption[0], caption[1], caption[-1]]
    batch = noisy_batch([caption] * 300 + [one_token], tokenizer, 0.3, 3.0, np.random.default_rng(0),
                        whole_share=1.0, whole_keep=2)
    kept = Counter()
    for row, labels in zip(batch["input_ids"].tolist(), batch["labels"].tolist(), strict=True):
        row = [token for token in row if token != tokenizer.pad_token_id]
        assert row[-2:] == [mask, caption[-1]] and row.count(mask) == 1  # the rest is one <mask>
        assert row[:-2] == labels[:len(row) - 2]  # the opening tokens, unchanged
        kept[len(row) - 3] += 1
    assert sorted(kept) == [0, 1, 2] and min(kept.values()) > 80  # 0, 1 or 2 tokens kept, about evenly
    # A one-token caption keeps nothing: its only token is the one masked.
    assert batch["input_ids"][-1, :3].tolist() == [caption[0], mask, caption[-1]]


def test_the_trainer_masks_icti_captions_as_its_params_say(setup, tmp_path):
    student = Student.from_language_model(setup[1], StudentConfig(teacher=TEACHER, embed_dim=8))
    tokenizer, mask = student.tokenizer, student.tokenizer.mask_token_id
    caption = "there is a red circle on the left"
    ids = tokenizer(caption).input_ids
    inputs = objective.model_inputs({"caption": [caption] * 60}, student,
                                 params(setup, tmp_path, whole_caption_share=1.0, whole_caption_keep=2),
                                 np.random.default_rng(0), torch.device("cpu"))
    kept = {row.tolist().index(mask) - 1 for row in inputs["noisy_ids"]}
    assert kept == {0, 1, 2}  # every caption masked whole, after 0, 1 or 2 of its opening tokens
    assert all(row.tolist().count(mask) == 1 for row in inputs["noisy_ids"])
    assert inputs["labels"][0, :len(ids)].tolist() == ids


def test_noisy_batch_keeps_bos_eos_and_labels_the_whole_caption(setup):
    tokenizer = Student.from_language_model(setup[1], StudentConfig(teacher=TEACHER, embed_dim=8)).tokenizer
    ids = [tokenizer("a red circle on the left").input_ids, tokenizer("two shapes").input_ids]
    batch = noisy_batch(ids, tokenizer, 0.3, 3.0, np.random.default_rng(0))
    for row, original in enumerate(ids):
        inputs = batch["input_ids"][row][batch["attention_mask"][row] == 1].tolist()
        assert inputs[0] == original[0] and inputs[-1] == original[-1]
        assert tokenizer.mask_token_id in inputs
        labels = batch["labels"][row]
        assert labels[labels != -100].tolist() == original


# -- the student ---------------------------------------------------------------------------------------------
def test_prefixes_have_the_right_shape_and_wrong_features_are_refused(setup):
    pooled = Student.from_language_model(setup[1], StudentConfig(teacher=TEACHER, embed_dim=8, prefix_tokens=3))
    assert pooled.visual_prefix(torch.randn(2, 8)).shape == (2, 3, 32)
    patch = Student.from_language_model(setup[1], StudentConfig(teacher=TEACHER, embed_dim=8, prefix="patch",
                                                                visual_width=16))
    assert patch.visual_prefix(torch.randn(2, 5, 16)).shape == (2, 5, 32)
    with pytest.raises(VlkdError, match="do not fit the pooled prefix"):
        pooled.visual_prefix(torch.randn(2, 12))
    with pytest.raises(VlkdError, match="do not fit the patch prefix"):
        patch.visual_prefix(torch.randn(2, 16))


@pytest.mark.parametrize("where", ["after_prefix", "from_start"])
def test_from_start_the_text_is_read_at_the_positions_of_pretraining(setup, where):
    """With the prefix hidden from attention, the encoder's text states equal the language model's own on the text
    alone when the text keeps its pretraining positions (from_start), and differ when it sits behind the prefix."""
    student = Student.from_language_model(setup[1], StudentConfig(teacher=TEACHER, embed_dim=8, prefix_tokens=3,
                                                                  text_positions=where)).eval()
    encoded = student.tokenizer(["a red circle", "a large blue square at the top"], padding=True, return_tensors="pt")
    encoder = student.bart.get_encoder()
    with torch.no_grad():
        alone = encoder(input_ids=encoded.input_ids, attention_mask=encoded.attention_mask).last_hidden_state
        embeds, mask = student.encoder_inputs(encoded.input_ids, encoded.attention_mask, torch.randn(2, 8))
        mask[:, :3] = 0
        behind = encoder(inputs_embeds=embeds, attention_mask=mask).last_hidden_state[:, 3:]
    real = encoded.attention_mask.bool()
    same = torch.allclose(alone[real], behind[real], atol=1e-5, rtol=1e-4)
    assert same == (where == "from_start")


def test_text_embedding_ignores_padding(setup):
    student = Student.from_language_model(setup[1], StudentConfig(teacher=TEACHER, embed_dim=8)).eval()
    alone = student.tokenizer(["a red circle"], return_tensors="pt")
    padded = student.tokenizer(["a red circle", "a large blue square at the top"], padding=True, return_tensors="pt")
    with torch.no_grad():
        one = student.text_embedding(alone.input_ids, alone.attention_mask)
        two = student.text_embedding(padded.input_ids, padded.attention_mask)
    torch.testing.assert_close(one[0], two[0], atol=1e-5, rtol=1e-5)


# -- training ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("objective", ["ttdm", "itcl", "icti"])
def test_training_lowers_each_loss(setup, tmp_path, objective):
    weights = {f"{name}_weight": float(name == objective) for name in ("ttdm", "itcl", "icti")}
    metrics = train.distill(params(setup, tmp_path, epochs=6, batch_size=10, **weights))
    means = [epoch[objective] for epoch in metrics["this_run"]["epoch_means"]]
    assert set(metrics["final"]) == {objective, "loss"}
    assert means[-1] < 0.9 * means[0], means


def test_training_with_all_objectives_saves_a_loadable_student(setup, tmp_path):
    metrics = train.distill(params(setup, tmp_path, epochs=4, batch_size=10))
    assert metrics["this_run"]["epoch_means"][-1]["loss"] < metrics["this_run"]["epoch_means"][0]["loss"]
    assert not (tmp_path / "ckpt").exists() or not any((tmp_path / "ckpt").iterdir())  # removed when done
    assert (tmp_path / "plots" / "plots" / "metrics" / "train" / "icti.tsv").is_file()  # dvclive curves

    student = Student.from_pretrained(tmp_path / "student")
    assert student.config.teacher == FeatureStore(setup[0]).teacher
    batch = next(FeatureStore(setup[0]).iter_batches(3))
    prompts = ["Question: What color is the circle? Answer: <mask>"] * 3
    again = Student.from_pretrained(tmp_path / "student")
    assert student.generate(batch["image_embedding"], prompts, num_beams=2, max_new_tokens=6) == \
        again.generate(batch["image_embedding"], prompts, num_beams=2, max_new_tokens=6)
    saved = load_file(str(tmp_path / "student" / "projections.safetensors"))
    torch.testing.assert_close(saved["text_projection.weight"], student.text_projection.weight.detach())


def test_optimization_takes_every_trainable_parameter_once_and_decays_only_matrices(setup):
    student = Student.from_language_model(setup[1], StudentConfig(embed_dim=32, teacher=TEACHER))
    groups = Optimization(student, 1e-3, 0.01, 2, 4).optimizer.param_groups
    trainable = {id(p) for p in student.parameters() if p.requires_grad}
    assert sorted(id(p) for g in groups for p in g["params"]) == sorted(trainable)  # each once
    decayed = [p for g in groups if g["weight_decay"] for p in g["params"]]
    exempt = [p for g in groups if not g["weight_decay"] for p in g["params"]]
    assert all(p.ndim == 2 for p in decayed) and any(p.ndim == 1 for p in exempt)
    assert any(p is student.bart.model.shared.weight for p in exempt)  # BART's token embedding: no decay


def test_optimization_steps_follow_transformers_warmup_then_cosine():
    model = torch.nn.Linear(2, 2)
    optimization = Optimization(model, 1.0, 0.0, warmup_steps=2, total_steps=4, max_grad_norm=1.0)
    used = []
    for _ in range(4):
        model(torch.ones(1, 2)).sum().backward()
        used.append(optimization.step())
        assert all(p.grad is None for p in model.parameters())  # zeroed after each step
    assert used == pytest.approx([0.0, 0.5, 1.0, 0.5])  # the learning rate each step used


def test_prefix_tokens_are_refused_with_the_patch_prefix(setup, tmp_path):
    with pytest.raises(ValueError, match="pooled prefix only"):
        params(setup, tmp_path, prefix="patch", prefix_tokens=4)


def test_a_patch_prefix_student_trains_and_loads(setup, tmp_path):
    metrics = train.distill(params(setup, tmp_path, prefix="patch", grad_accum=2, epochs=1, schedule="linear"))
    assert metrics["steps"] == 30 // 6 // 2  # optimizer steps of two micro-batches each
    assert Student.from_pretrained(tmp_path / "student").config.prefix == "patch"


def test_k_accumulated_micro_batches_take_the_step_of_one_batch_k_times_larger(setup, tmp_path, monkeypatch):
    """grad_accum 3 over micro-batches of 10 rows makes the optimizer step that one batch of 30 rows makes: the
    same gradients when the optimizer reads them, the same weights after its step, the same reported loss.

    Equal only for an objective that is a mean over rows and draws nothing at random: TTDM alone, dropout off.
    The stage's other terms differ between the two by design: ITCL contrasts each micro-batch with its own
    negatives, ICTI averages over each micro-batch's tokens and draws its spans per micro-batch, and dropout
    draws its masks per micro-batch. The gradients are what must match: AdamW's step hardly changes when every
    gradient is scaled alike, so without the 1/k the weights alone would still pass. Its first step moves each
    weight by about lr whatever the gradient's size, and where a gradient is near AdamW's eps its float noise
    moves the weight by a small part of lr: the weights are compared to lr / 10 (a step on other rows moves
    them by up to 2 lr)."""
    plm = tmp_path / "plm"
    shutil.copytree(setup[1], plm)
    config = json.loads((plm / "config.json").read_text())
    (plm / "config.json").write_text(json.dumps(config | {"dropout": 0.0, "attention_dropout": 0.0,
                                                          "activation_dropout": 0.0}))
    gradients: dict[str, list] = {}

    class ReadsTheGradients(Optimization):
        def step(self) -> float:
            gradients[run] = [None if p.grad is None else p.grad.clone() for p in self.parameters]
            return super().step()

    monkeypatch.setattr(train, "Optimization", ReadsTheGradients)
    metrics, weights = {}, {}
    for run, (batch_size, grad_accum) in {"accumulated": (10, 3), "one batch": (30, 1)}.items():
        run_params = params(setup, tmp_path / run, plm=plm, batch_size=batch_size, grad_accum=grad_accum, epochs=1,
                            itcl_weight=0.0, icti_weight=0.0)
        metrics[run] = train.distill(run_params)
        assert metrics[run]["steps"] == 1
        weights[run] = load_file(str(run_params.output / "model.safetensors")) | \
            load_file(str(run_params.output / "projections.safetensors"))
    assert any(g is not None for g in gradients["one batch"])
    for index, (accumulated, whole) in enumerate(zip(gradients["accumulated"], gradients["one batch"], strict=True)):
        assert (accumulated is None) == (whole is None), index
        if whole is not None:
            torch.testing.assert_close(accumulated, whole, rtol=1e-4, atol=1e-7,
                                       msg=lambda message, index=index: f"gradient of parameter {index}: {message}")
    for name, whole in weights["one batch"].items():
        torch.testing.assert_close(weights["accumulated"][name], whole, rtol=0, atol=run_params.lr / 10,
                                   msg=lambda message, name=name: f"{name} after the step: {message}")
    assert metrics["accumulated"]["final"]["ttdm"] == pytest.approx(metrics["one batch"]["final"]["ttdm"], abs=1e-5)


def test_a_killed_run_resumes_to_the_same_weights(setup, tmp_path, monkeypatch):
    train.distill(params(setup, tmp_path / "clean"))
    clean = load_file(str(tmp_path / "clean" / "student" / "model.safetensors"))

    real_step, calls = train.train_step, []

    def die_at_step_7(*args, **kwargs):
        calls.append(1)
        if len(calls) == 7:  # after the checkpoint of step 6
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    monkeypatch.setattr(train, "train_step", die_at_step_7)
    with pytest.raises(KeyboardInterrupt):
        train.distill(params(setup, tmp_path / "killed"))
    assert not (tmp_path / "killed" / "student").exists()
    monkeypatch.setattr(train, "train_step", real_step)
    metrics = train.distill(params(setup, tmp_path / "killed"))
    assert metrics["this_run"]["resumed_from_step"] == 6
    resumed = load_file(str(tmp_path / "killed" / "student" / "model.safetensors"))
    for name, tensor in clean.items():
        torch.testing.assert_close(resumed[name], tensor, atol=1e-6, rtol=1e-5)


def test_ranks_read_disjoint_shares_of_the_rows(setup):
    store = FeatureStore(setup[0])
    shares = []
    for rank in (0, 1):
        batches = FeatureBatches(store, ["image_embedding"], 4, seed=3, rank=rank, world_size=2, window_files=2)
        shares.append([key for batch in batches.epoch(0) for key in batch["key"]])
    assert len(shares[0]) == len(shares[1]) == 3 * 4  # 30 rows: 15 per rank, 3 whole batches each
    assert not set(shares[0]) & set(shares[1])
    again = FeatureBatches(store, ["image_embedding"], 4, seed=3, rank=0, world_size=2, window_files=2)
    assert [k for b in again.epoch(0, skip=1) for k in b["key"]] == shares[0][4:]


def test_two_process_ddp_run_on_cpu(setup, tmp_path):
    features, plm, _ = setup
    params_file = tmp_path / "params.yaml"
    params_file.write_text(
        f"distill:\n  features: {features}\n  kept: null\n  plm: {plm}\n  output: {tmp_path / 'student'}\n"
        f"  checkpoints: {tmp_path / 'ckpt'}\n  plots: {tmp_path / 'plots'}\n  epochs: 1\n  batch_size: 4\n"
        "  device: cpu\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "vlkd.cli", "--params", str(params_file), "distill", "--metrics", str(tmp_path / "m.json")],
        capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    import json
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["ranks"] == 2 and metrics["steps"] == 30 // 2 // 4
    assert Student.from_pretrained(tmp_path / "student").config.teacher == FeatureStore(features).teacher


# -- bad input ---------------------------------------------------------------------------------------------
def invoke(*args):
    return CliRunner().invoke(main, ["distill", "--device", "cpu", *args])


def assert_one_line_error(result, message):
    assert result.exit_code == 2, result.output
    assert result.stderr.count("\n") == 1 and message in result.stderr, result.stderr


def test_features_of_another_teacher_are_refused(setup, tmp_path, tiny_world_shards):
    features, plm, _ = setup
    trained = params(setup, tmp_path, epochs=1)
    train.distill(trained)
    other = load_teacher(TEST_MODEL, str(make_random_teacher(tmp_path / "other", seed=1)))
    extract_features(tiny_world_shards[1], tmp_path / "other-features", other,
                     Encoding(batch_size=8, num_workers=0, device="cpu", precision="auto", image_tokens=False))
    assert_one_line_error(invoke("--features", str(tmp_path / "other-features"), "--plm", str(plm),
                                 "--init", str(trained.output), "--output", str(tmp_path / "s2")),
                          "but the student was distilled from")


def test_missing_text_embedding_with_ttdm_is_refused(setup, tmp_path):
    features, plm, _ = setup
    (tmp_path / "f").mkdir()
    for path in sorted(features.glob("*.parquet")):
        table = pq.read_table(path)
        pq.write_table(table.drop_columns(["text_embedding"]), tmp_path / "f" / path.name)
    assert_one_line_error(invoke("--features", str(tmp_path / "f"), "--plm", str(plm)), "no text_embedding column")
    assert_one_line_error(invoke("--features", str(tmp_path / "missing"), "--plm", str(plm)), "no feature files")
    assert_one_line_error(invoke("--features", str(features), "--plm", str(tmp_path / "no-plm")),
                          "cannot load the language model")


def test_a_nan_loss_stops_with_a_clear_message_and_keeps_the_last_checkpoint(setup, tmp_path, monkeypatch):
    calls = []
    real = objective.ttdm_loss

    def nan_on_fifth_call(*args):
        calls.append(1)
        value = real(*args)
        return value * float("nan") if len(calls) == 5 else value

    monkeypatch.setattr(objective, "ttdm_loss", nan_on_fifth_call)
    with pytest.raises(VlkdError, match="not finite at step 5.*last good checkpoint"):
        train.distill(params(setup, tmp_path))
    checkpoints = list((tmp_path / "ckpt").glob("*/last.pt"))
    assert len(checkpoints) == 1 and torch.load(checkpoints[0], weights_only=True)["step"] == 4
    assert not (tmp_path / "student").exists()


def test_broken_feature_column_types_are_refused(setup, tmp_path):
    """Unknown columns do not matter; a features folder of plain Parquet files is refused."""
    (tmp_path / "plain").mkdir()
    pq.write_table(pa.table({"key": ["a"], "caption": ["b"]}), tmp_path / "plain" / "00000.parquet")
    assert_one_line_error(invoke("--features", str(tmp_path / "plain"), "--plm", str(setup[1])),
                          "not a vlkd feature file")



def test_icti_draws_each_image_caption_and_falls_back_to_the_stored_one():
    batch = {"caption": ["a red circle", "a blue star"], "captions": [["a red circle", "a circle on the left"], []]}
    noise = np.random.default_rng(0)
    drawn = [objective.icti_captions(batch, noise) for _ in range(40)]
    assert {first for first, _ in drawn} == {"a red circle", "a circle on the left"}
    assert {second for _, second in drawn} == {"a blue star"}
    assert objective.icti_captions({"caption": ["a cat"]}, noise) == ["a cat"]


def test_retention_batches_are_the_language_models_own_infilling_examples(setup, tmp_path):
    plm = shutil.copytree(setup[1], tmp_path / "plm")
    (plm / "vlkd-plm.json").write_text(json.dumps({"params": {"answer_mask_share": 1.0}}))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("a red circle. Question: What color is the circle? Answer: red\na blue star on the left\n")
    tokenizer = Student.from_language_model(plm, StudentConfig(teacher=TEACHER, embed_dim=8)).tokenizer
    batches = RetentionBatches(corpus, tokenizer, plm, mask_ratio=0.3, poisson_lambda=3.0, max_length=64)
    batch = batches.batch(8, np.random.default_rng(0))
    for inputs, mask, labels in zip(batch["input_ids"], batch["attention_mask"], batch["labels"], strict=True):
        source = tokenizer.decode(inputs[mask == 1])
        target = tokenizer.decode(labels[labels != -100])
        assert target in ("<s>a red circle. Question: What color is the circle? Answer: red</s>",
                          "<s>a blue star on the left</s>")
        if "Question" in target:  # the answer, and only the answer, is masked: as `vlkd plm` pretrained it
            assert " ".join(source.replace("<mask>", " <mask>").split()) == (
                "<s>a red circle. Question: What color is the circle? Answer: <mask></s>")
        else:
            assert "<mask>" in source


def test_retention_batches_hold_documents_of_similar_length_and_draw_every_document_alike(setup, tmp_path,
                                                                                         monkeypatch):
    from vlkd.distill import retention

    corpus = tmp_path / "corpus.txt"
    short, long = "a red circle", " ".join(["a blue star on the left and a red circle at the top"] * 4)
    corpus.write_text("\n".join(f"{i} {short if i % 2 else long}" for i in range(200)) + "\n")
    tokenizer = Student.from_language_model(setup[1], StudentConfig(teacher=TEACHER, embed_dim=8)).tokenizer

    def draw(band_batches: int) -> tuple[float, Counter]:
        monkeypatch.setattr(retention, "BAND_BATCHES", band_batches)
        batches = RetentionBatches(corpus, tokenizer, setup[1], mask_ratio=0.3, poisson_lambda=3.0, max_length=64)
        rng, padded, drawn = np.random.default_rng(0), [], Counter()
        for _ in range(500):
            batch = batches.batch(4, rng)
            padded.append(1 - batch["attention_mask"].float().mean().item())
            drawn.update(int(tokenizer.decode(labels[labels != -100][1:]).split()[0]) for labels in batch["labels"])
        return float(np.mean(padded)), drawn

    banded, drawn = draw(retention.BAND_BATCHES)
    whole, _ = draw(10**6)  # a band as long as the corpus: documents drawn from all of it
    assert banded < 0.5 * whole, (banded, whole)  # half the documents are 4x longer than the others
    assert len(drawn) == 200  # 10 draws each on average
    # The band wraps around the length order, so its ends are drawn as often as its middle: the 20 shortest
    # documents (odd numbers from 1) and the 20 longest (even numbers up to 198).
    shortest, longest = range(1, 40, 2), range(160, 200, 2)
    assert min(np.mean([drawn[i] for i in shortest]), np.mean([drawn[i] for i in longest])) > 0.6 * 10


def _plm_built_on(plm: Path, folder: Path, corpus: Path | None) -> Path:
    """A copy of the tiny language model whose manifest records `corpus` as `vlkd plm` does."""
    copy = shutil.copytree(plm, folder)
    record = {"params": {"corpus": str(corpus) if corpus else None},
              "inputs": {"corpus": sha256_file(corpus)} if corpus else {}}
    (copy / "vlkd-plm.json").write_text(json.dumps(record))
    return copy


def test_distillation_with_text_retention_reads_the_language_models_corpus(setup, tmp_path, tiny_world_shards):
    corpus = shutil.copy(tiny_world_shards[0] / "text" / "train.txt", tmp_path / "train.txt")
    plm = _plm_built_on(setup[1], tmp_path / "plm", corpus)
    metrics = train.distill(params(setup, tmp_path, plm=plm, retention_weight=1.0))
    assert math.isfinite(metrics["final"]["retention"]) and metrics["final"]["retention"] > 0
    assert (tmp_path / "plots" / "plots" / "metrics" / "train" / "retention.tsv").is_file()
    without = _plm_built_on(setup[1], tmp_path / "plm-without", None)
    with pytest.raises(VlkdError, match="built without one; set plm.corpus"):
        train.distill(params(setup, tmp_path / "again", plm=without, retention_weight=1.0))
    with corpus.open("a") as file:  # the text changed after the language model was built on it
        file.write("a new document\n")
    with pytest.raises(VlkdError, match="has changed since; run `vlkd plm` again"):
        train.distill(params(setup, tmp_path / "changed", plm=plm, retention_weight=1.0))


def test_a_fresh_student_on_the_rows_the_filter_kept_and_on_none(setup, tmp_path):
    from vlkd.config import FilterParams
    from vlkd.filter.run import filter_corpus

    features = setup[0]
    rules = dict(features=features, min_image_side=None, max_aspect_ratio=None, exact_duplicates=False,
                 clip_score_min=None, semdedup_clusters=None, languages=None)
    summary = filter_corpus(FilterParams(output=tmp_path / "kept", min_caption_words=8, **rules))
    assert 6 <= summary["kept"] < 30  # some of the 30 rows have a caption of eight words or more
    metrics = train.distill(params(setup, tmp_path / "some", kept=tmp_path / "kept", batch_size=3, epochs=1))
    assert metrics["trained_rows"] == {"new": summary["kept"], "replayed": 0}
    assert metrics["steps"] == summary["kept"] // 3
    filter_corpus(FilterParams(output=tmp_path / "none", min_caption_words=100, **rules))
    with pytest.raises(VlkdError, match="kept none of the 30 feature rows"):
        train.distill(params(setup, tmp_path / "nothing", kept=tmp_path / "none"))


def test_max_steps_fixes_the_budget_whatever_the_epochs(setup, tmp_path):
    metrics = train.distill(params(setup, tmp_path, epochs=1, max_steps=7, ttdm_weight=1.0, itcl_weight=0.0,
                                   icti_weight=0.0))
    assert metrics["steps"] == 7 and metrics["epochs"] == 2  # 30 rows in batches of 6: 5 steps an epoch


# -- continuing from a student: the rows it has not seen, plus a replayed sample ---------------------------
def test_continuation_takes_the_unseen_rows_and_a_seeded_sample_of_the_seen_ones():
    files = {"a.parquet": np.arange(10), "b.parquet": np.arange(10), "c.parquet": np.arange(5)}
    seen = {"a.parquet": 10, "b.parquet": 6}  # b grew by 4 rows, c is new
    chosen = continuation_rows(files, seen, replay=1.0, seed=0)
    assert (chosen.new, chosen.replayed) == (9, 9)
    np.testing.assert_array_equal(chosen.rows["c.parquet"], np.arange(5))
    new_of_b = chosen.rows["b.parquet"][chosen.rows["b.parquet"] >= 6]
    np.testing.assert_array_equal(new_of_b, [6, 7, 8, 9])
    old = [(name, i) for name, rows in chosen.rows.items() for i in rows if i < seen.get(name, 0)]
    assert len(old) == len(set(old)) == 9  # drawn without replacement, from seen rows only
    again = continuation_rows(files, seen, replay=1.0, seed=0)
    assert all(np.array_equal(again.rows[name], rows) for name, rows in chosen.rows.items())
    assert continuation_rows(files, seen, replay=0.0, seed=0).replayed == 0
    assert continuation_rows(files, seen, replay=10.0, seed=0).replayed == 16  # every seen row, once
    everything = {name: len(rows) for name, rows in files.items()}
    assert continuation_rows(files, everything, replay=1.0, seed=0).total == 0


def test_a_student_continues_on_the_rows_it_has_not_seen(setup, tmp_path):
    features, _, _ = setup
    first = tmp_path / "first-features"
    first.mkdir()
    shutil.copy(sorted(features.glob("*.parquet"))[0], first)  # the corpus before the refresh: 10 rows
    train.distill(params(setup, tmp_path / "v1", features=first, epochs=1, batch_size=5))
    seen = json.loads((tmp_path / "v1" / "student" / "feature-rows.json").read_text())
    assert seen == {"files": {sorted(features.glob("*.parquet"))[0].name: 10}}

    metrics = train.distill(params(setup, tmp_path / "v2", init=tmp_path / "v1" / "student", epochs=2,
                                   batch_size=5, replay=0.5))
    assert metrics["trained_rows"] == {"new": 20, "replayed": 10}  # 2 new files, half as many old rows
    assert metrics["steps"] == 2 * 30 // 5  # in proportion to the new rows, not to the corpus
    seen = json.loads((tmp_path / "v2" / "student" / "feature-rows.json").read_text())
    assert seen["files"] == {path.name: 10 for path in features.glob("*.parquet")}
    assert Student.from_pretrained(tmp_path / "v2" / "student").config.teacher == FeatureStore(features).teacher


def test_a_student_that_has_seen_every_row_is_written_unchanged(setup, tmp_path):
    train.distill(params(setup, tmp_path / "v1", epochs=1, batch_size=10))
    metrics = train.distill(params(setup, tmp_path / "v2", init=tmp_path / "v1" / "student"))
    assert metrics["steps"] == 0 and metrics["trained_rows"] == {"new": 0, "replayed": 0}
    # every output dvc.yaml declares exists, or `dvc repro` fails the stage: the curves folder, empty
    assert list((tmp_path / "v2" / "plots" / "plots" / "metrics").iterdir()) == []
    before = load_file(str(tmp_path / "v1" / "student" / "model.safetensors"))
    after = load_file(str(tmp_path / "v2" / "student" / "model.safetensors"))
    for name, tensor in before.items():
        torch.testing.assert_close(after[name], tensor, atol=0, rtol=0)


def test_an_init_folder_with_only_a_readme_starts_fresh_and_anything_else_is_refused(setup, tmp_path):
    promoted = tmp_path / "promoted"
    promoted.mkdir()
    (promoted / "README.md").write_text("the refresh flow puts the promoted student here\n")
    metrics = train.distill(params(setup, tmp_path, init=promoted, epochs=1, batch_size=10))
    assert metrics["trained_rows"] == {"all": 30} and metrics["init"] is None
    (promoted / "notes.txt").write_text("not a student")
    with pytest.raises(VlkdError, match="has no vlkd-student.json"):
        train.distill(params(setup, tmp_path / "again", init=promoted))


def test_warmup_takes_at_most_a_tenth_of_a_short_run(setup, tmp_path):
    train.distill(params(setup, tmp_path, epochs=4, batch_size=6, warmup_steps=100, lr=1e-3))  # 20 steps
    rates = [float(line.split("\t")[1]) for line in
             (tmp_path / "plots" / "plots" / "metrics" / "train" / "lr.tsv").read_text().splitlines()[1:]]
    assert len(rates) == 20
    assert rates[:3] == pytest.approx([0.0, 5e-4, 1e-3])  # 2 warmup steps, then the peak, then the decay
    assert rates[-1] < 0.1 * max(rates)


# -- caption reading: the image prefix read as the language model reads the caption -------------------------
def _reading(setup, tmp_path, corpus_text: str, prompt: str = "Question: {question} Answer: <mask>"):
    from vlkd.distill.reading import CaptionReading
    from vlkd.models.student import load_language_model

    corpus = tmp_path / "corpus.txt"
    corpus.write_text(corpus_text)
    reader, tokenizer = load_language_model(setup[1], "distill.plm")
    return CaptionReading(corpus, tokenizer, reader, prompt, 64, torch.device("cpu"))


def test_caption_reading_asks_the_corpus_questions_and_takes_the_language_models_reading_of_the_caption(
        setup, tmp_path):
    reading = _reading(setup, tmp_path, "a red circle. Question: What color is the circle? Answer: red\n"
                                        "a blue star on the left\n")
    assert reading.questions == ["What color is the circle?"]
    tokenizer, reader = reading.tokenizer, reading.reader
    start, eos = reader.config.decoder_start_token_id, tokenizer.eos_token_id

    def language_model(caption: str, answer: list[int]) -> torch.Tensor:
        """The language model itself, reading the caption before the prompt: the next token's log-probabilities."""
        described = f"{caption.rstrip('.')}. Question: What color is the circle? Answer:"
        text = tokenizer([described + " <mask>"], return_tensors="pt")
        head = tokenizer([described])["input_ids"][0][:-1]
        with torch.no_grad():
            logits = reader(input_ids=text.input_ids, attention_mask=text.attention_mask,
                            decoder_input_ids=torch.tensor([[start, *head, *answer]])).logits
        return logits[0, -1].log_softmax(-1)

    captions = ["a red circle at the top.", "a green square"]
    batch = reading.batch([[caption] for caption in captions], np.random.default_rng(0))
    for row, caption in enumerate(captions):
        encoder = tokenizer.decode(batch["input_ids"][row][batch["attention_mask"][row] == 1])
        # The image stands where the caption stands for the language model.
        assert encoder == "<s>Question: What color is the circle? Answer: <mask></s>"
        copied = batch["copy_labels"][row]
        assert tokenizer.decode(copied[copied != -100]) == "<s>Question: What color is the circle? Answer:"
        # The slots follow the language model's greedy answer up to its end: each slot's target is its reading
        # with the answer so far, and the student's decoder is fed that answer.
        answer, slots = [], int(batch["answer_mask"][row].sum())
        for slot in range(slots):
            expected = language_model(caption, answer)
            torch.testing.assert_close(batch["target"][row, slot], expected, atol=1e-5, rtol=1e-4)
            answer.append(int(expected.argmax()))
        assert answer[-1] == eos or slots == 4
        position = batch["answer_position"][row, :slots]
        decoder = batch["decoder_input_ids"][row][:int(position[-1]) + 1]
        assert tokenizer.decode(decoder[:int(position[0]) + 1]) == "</s><s>Question: What color is the circle? Answer:"
        assert decoder[int(position[0]) + 1:].tolist() == answer[:-1]
        assert (copied[int(position[0]):] == -100).all()
    assert not torch.allclose(batch["target"][0, 0], batch["target"][1, 0])  # each caption is read
    # An image with both captions: the product of the two readings (their mean log-probability, renormalised).
    both = reading.batch([captions], np.random.default_rng(0))["target"][0, 0]
    torch.testing.assert_close(both, batch["target"][:, 0].mean(0).log_softmax(-1), atol=1e-5, rtol=1e-4)


def test_the_cached_decoder_reads_each_row_as_the_whole_decoder_run_again_does(setup, tmp_path):
    from vlkd.distill.reading import _CachedDecoder, answer_slot_inputs

    reading = _reading(setup, tmp_path, "a red circle. Question: What color is the circle? Answer: red\n")
    tokenizer, reader = reading.tokenizer, reading.reader
    texts = ["a red circle. Question: Where is it? Answer:",
             "two shapes: a large blue star on the left and a small green square at the top. "
             "Question: How many shapes are there? Answer:",
             "x. Question: Is it? Answer:"]
    start = reader.config.decoder_start_token_id
    inputs = answer_slot_inputs(tokenizer, [text + " <mask>" for text in texts], texts, start, 256)  # no truncation
    decoder = _CachedDecoder(reader, inputs, torch.device("cpu"))
    assert decoder.shared > 0  # the rows share cached columns

    def whole(row: int, answer: list[int]) -> torch.Tensor:
        head = tokenizer([texts[row]])["input_ids"][0][:-1]
        encoder = tokenizer([texts[row] + " <mask>"], return_tensors="pt")
        with torch.no_grad():
            return reader(input_ids=encoder.input_ids, attention_mask=encoder.attention_mask,
                          decoder_input_ids=torch.tensor([[start, *head, *answer]])).logits[0, -1]

    # Rows of different head lengths, answers of different lengths, and fewer rows as answers end.
    calls = (([0, 1, 2], [[], [], []]), ([0, 1, 2], [[7], [3, 4], [5, 9, 11]]), ([0, 2], [[7, 8], [5, 9]]),
             ([2], [[5, 9, 11]]))
    for rows, answers in calls:
        with torch.no_grad():
            logits = decoder.next_token(answers, rows)
        for got, row, answer in zip(logits, rows, answers, strict=True):
            torch.testing.assert_close(got, whole(row, answer), atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="or fewer"):  # a row the cache has dropped
        decoder.next_token([[]], [0])


def test_caption_reading_needs_questions_in_the_corpus_and_a_prompt_that_ends_with_the_answer(setup, tmp_path):
    with pytest.raises(VlkdError, match="has none; set distill.reading_weight: 0"):
        _reading(setup, tmp_path, "a blue star on the left\n")
    with pytest.raises(VlkdError, match="must end with <mask>"):
        _reading(setup, tmp_path, "a. Question: Why? Answer: so\n", prompt="Q: {question} A: <mask> thanks")


def test_reading_loss_is_the_copy_cross_entropy_plus_the_answers_kl():
    from vlkd.models.losses import reading_loss

    logits = torch.randn(2, 5, 7)
    labels = torch.tensor([[1, 2, -100, -100, -100], [3, 4, 5, -100, -100]])
    position = torch.tensor([[2, 3], [3, 0]])  # the second row's answer has one slot
    mask = torch.tensor([[True, True], [True, False]])
    target = torch.randn(2, 2, 7).log_softmax(-1)
    copy = F.cross_entropy(logits.reshape(-1, 7), labels.reshape(-1), ignore_index=-100)

    def kl(row: int, slot: int) -> torch.Tensor:
        answer = logits[row, position[row, slot]].log_softmax(-1)
        return (target[row, slot].exp() * (target[row, slot] - answer)).sum()

    expected = copy + (kl(0, 0) + kl(0, 1) + kl(1, 0)) / 2  # summed over an answer's slots, mean over rows
    torch.testing.assert_close(reading_loss(logits, labels, position, mask, target), expected)
    same = logits.clone()
    same[0, 2], same[0, 3], same[1, 3] = target[0, 0], target[0, 1], target[1, 0]  # the language model's answer
    torch.testing.assert_close(reading_loss(same, labels, position, mask, target), copy)


def test_distillation_with_caption_reading_lowers_it(setup, tmp_path, tiny_world_shards):
    corpus = shutil.copy(tiny_world_shards[0] / "text" / "train.txt", tmp_path / "train.txt")
    plm = _plm_built_on(setup[1], tmp_path / "plm", corpus)
    metrics = train.distill(params(setup, tmp_path, plm=plm, epochs=6, batch_size=10, ttdm_weight=0.0,
                                   itcl_weight=0.0, icti_weight=1.0, reading_weight=1.0))
    means = [epoch["reading"] for epoch in metrics["this_run"]["epoch_means"]]
    assert set(metrics["final"]) == {"icti", "reading", "loss"}
    assert means[-1] < 0.9 * means[0], means


def test_an_aligned_teacher_student_reads_the_captions_text_embedding_where_the_image_was(setup, tmp_path):
    """The ladder's diagnostic rung: with aligned_teacher every objective gets the caption's text embedding in
    place of the image embedding, and the student records it (evaluation then feeds it caption features)."""
    student = Student.from_language_model(setup[1], StudentConfig(teacher=TEACHER, embed_dim=4))
    batch = {"caption": ["a red circle", "a blue star"], "image_embedding": torch.eye(4)[:2],
             "text_embedding": torch.eye(4)[2:]}
    aligned = objective.model_inputs(batch, student, params(setup, tmp_path, aligned_teacher=True),
                                     np.random.default_rng(0), torch.device("cpu"))
    assert torch.equal(aligned["prefix_features"], batch["text_embedding"])
    assert torch.equal(aligned["image_embedding"], batch["text_embedding"])
    usual = objective.model_inputs(batch, student, params(setup, tmp_path), np.random.default_rng(0),
                                   torch.device("cpu"))
    assert torch.equal(usual["prefix_features"], batch["image_embedding"])
    with pytest.raises(ValidationError, match="aligned_teacher"):
        params(setup, tmp_path, aligned_teacher=True, prefix="patch")
    train.distill(params(setup, tmp_path, aligned_teacher=True, epochs=1))
    assert Student.from_pretrained(tmp_path / "student").config.aligned_teacher


def test_the_language_model_can_train_at_its_own_rate_and_the_projections_at_lr(setup, tmp_path):
    student = Student.from_language_model(setup[1], StudentConfig(teacher=TEACHER, embed_dim=8))
    rates = train._rates(params(setup, tmp_path, lr=1e-3, language_model_lr=1e-4))
    groups = Optimization(student, 1e-3, 0.01, 0, 10, lr_multipliers=rates).optimizer.param_groups
    rate_of = {id(p): group["initial_lr"] for group in groups for p in group["params"]}
    for name, param in student.named_parameters():
        if param.requires_grad:
            assert rate_of[id(param)] == pytest.approx(1e-4 if name.startswith("bart.") else 1e-3), name
    assert train._rates(params(setup, tmp_path)) is None
