"""Stage-0 vision pretraining: image- and patch-level label losses learn, bad setups fail naming the field, and
the export loads into the MoE tower (upcycled, same features)."""

from __future__ import annotations

import pytest
import torch

from mmoe.model.moe import MoEConfig
from mmoe.interop.factory import build_vision_encoder
from mmoe.model.vision import VisionConfig
from mmoe.training.config import OptimConfig
from mmoe.training.vision_pretrain import VisionPretrainModule

VISION = VisionConfig(image_size=32, patch_size=8, stem="conv", dim=32, depth=2, n_heads=2, mlp_ratio=2.0,
                      feature_layer=-1)


def _batch(n=4, classes=3, grid=4):
    torch.manual_seed(0)
    patch = (torch.rand(n, grid * grid, classes) < 0.2).float()
    boxes = torch.rand(n, grid * grid, 5)
    boxes[..., 4] = (patch.amax(-1) > 0).float()  # a box only where an object covers the patch
    return {"pixel_values": torch.randn(n, 3, 32, 32), "targets": patch.amax(1), "patch_targets": patch,
            "patch_boxes": boxes}


def _fit_term(module, batch: dict, term: str, steps: int) -> tuple[float, float]:
    """Train `module` on one batch; the logged `train/<term>` at the first and the last step."""
    logged = {}
    module.log = lambda name, value, **k: logged.__setitem__(name, value.item())
    opt = torch.optim.AdamW(module.parameters(), lr=3e-3)
    for step in range(steps):
        loss = module.training_step(batch, 0)
        first = logged[f"train/{term}"] if step == 0 else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    return first, logged[f"train/{term}"]


def test_label_and_patch_losses_fall_on_a_small_batch():
    torch.manual_seed(0)
    module = VisionPretrainModule(VISION, num_classes=3, patch_loss=1.0)
    module.log = lambda *a, **k: None  # no trainer attached
    batch = _batch()
    opt = torch.optim.AdamW(module.parameters(), lr=3e-3)
    first = None
    for _ in range(60):
        loss = module.training_step(batch, 0)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.3 * first
    image_logits, tokens = module(batch["pixel_values"])
    patch_logits = tokens["patch"]
    assert ((patch_logits > 0) == batch["patch_targets"].bool()).float().mean() > 0.95
    assert image_logits.shape == (4, 3) and patch_logits.shape == (4, 16, 3) and set(tokens) == {"patch"}


def test_box_loss_learns_the_boxes_of_covered_patches_and_ignores_the_rest():
    torch.manual_seed(0)
    module = VisionPretrainModule(VISION, num_classes=3, box_loss=1.0)
    batch = _batch()
    mask = batch["patch_boxes"][..., 4].bool()
    first, last = _fit_term(module, batch, "box_loss", 150)
    assert last < 0.3 * first
    _, tokens = module(batch["pixel_values"])
    boxes = tokens["boxes"]
    assert set(tokens) == {"boxes"} and boxes.shape == (4, 16, 4)
    err = (boxes - batch["patch_boxes"][..., :4]).abs().mean(-1)
    assert err[mask].mean() < 0.05
    # changing the boxes of uncovered patches must not change the loss: they are masked out
    moved = {**batch, "patch_boxes": batch["patch_boxes"].clone()}
    moved["patch_boxes"][~mask] = torch.tensor([9.0, 9.0, 9.0, 9.0, 0.0])
    assert module._dense_terms(tokens, moved)["box_loss"] == module._dense_terms(tokens, batch)["box_loss"]


NAMES = ["red circle", "red square", "blue circle"]


def test_word_targets_are_the_words_class_names_share():
    from mmoe.training.vision_pretrain import class_word_matrix, shared_name_words

    assert shared_name_words(NAMES) == ["circle", "red"]  # "square" and "blue" name one class each
    assert shared_name_words(["Red Circle", "red  circle x"]) == ["circle", "red"]  # case and spacing
    torch.testing.assert_close(class_word_matrix(NAMES, ["circle", "red"]),
                               torch.tensor([[1.0, 1.0], [0.0, 1.0], [1.0, 0.0]]))
    module = VisionPretrainModule(VISION, num_classes=3, word_loss=1.0, class_names=NAMES)
    batch = _batch()
    # patch 0 shows a red square and a blue circle: both words; patch 1 a red square only; patch 2 nothing
    batch["patch_targets"][0, :3] = torch.tensor([[0.0, 1.0, 1.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    words = torch.zeros(4, 16, 2)
    words[0, :3] = torch.tensor([[9.0, 9.0], [-9.0, 9.0], [-9.0, -9.0]])  # confident and right on those three
    per_token = module._dense_terms({"words": words}, batch)["word_loss"]
    wrong = words.clone()
    wrong[0, 1] = torch.tensor([9.0, -9.0])  # says "circle, not red" for the red square
    assert module._dense_terms({"words": wrong}, batch)["word_loss"] > per_token + 0.1


def test_word_loss_falls_and_the_probe_names_the_shared_words_of_each_patch():
    torch.manual_seed(0)
    module = VisionPretrainModule(VISION, num_classes=3, word_loss=1.0, class_names=NAMES)
    batch = _batch()
    first, last = _fit_term(module, batch, "word_loss", 60)
    assert last < 0.3 * first
    _, tokens = module(batch["pixel_values"])
    assert set(tokens) == {"words"} and tokens["words"].shape == (4, 16, 2)
    want = (batch["patch_targets"] @ module.class_words).clamp(max=1.0).bool()
    assert ((tokens["words"] > 0) == want).float().mean() > 0.95


def test_word_labels_name_the_shared_words_present_and_no_colour_shape_pair():
    torch.manual_seed(0)
    module = VisionPretrainModule(VISION, num_classes=3, labels="words", class_names=NAMES)
    module.log = lambda *a, **k: None
    batch = _batch()
    logits, tokens = module(batch["pixel_values"])
    assert logits.shape == (4, 2) and tokens == {}  # "circle", "red"; no per-token probe asked for
    # {red square, blue circle} and {red circle} hold the same words: the loss cannot tell the pairs apart
    pairs = {**batch, "targets": torch.tensor([[0.0, 1.0, 1.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0]])}
    single = {**pairs, "targets": torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0]])}
    torch.testing.assert_close(module.training_step(pairs, 0), module.training_step(single, 0))
    classes = VisionPretrainModule(VISION, num_classes=3, class_names=NAMES)
    classes.log = module.log
    assert classes.training_step(pairs, 0) != classes.training_step(single, 0)
    # the words are learned: one image-level logit per word, right on the training batch
    want = torch.tensor([[1.0, 1.0], [1.0, 1.0], [0.0, 1.0], [0.0, 0.0]])
    opt = torch.optim.AdamW(module.parameters(), lr=3e-3)
    for _ in range(60):
        loss = module.training_step(pairs, 0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert ((module(batch["pixel_values"])[0] > 0) == want.bool()).all()
    with pytest.raises(ValueError, match="model.labels must be 'classes' or 'words'"):
        VisionPretrainModule(VISION, num_classes=3, labels="pairs", class_names=NAMES)
    with pytest.raises(ValueError, match="model.labels='words' needs model.class_names"):
        VisionPretrainModule(VISION, num_classes=3, labels="words")


def test_patch_loss_without_patch_targets_or_with_the_wrong_grid_fails_naming_the_field():
    module = VisionPretrainModule(VISION, num_classes=3, patch_loss=1.0)
    module.log = lambda *a, **k: None
    batch = _batch()
    with pytest.raises(ValueError, match="data.patch_grid"):
        module.training_step({k: v for k, v in batch.items() if k != "patch_targets"}, 0)
    with pytest.raises(ValueError, match="image_size // patch_size"):
        module.training_step({**batch, "patch_targets": torch.zeros(4, 9, 3)}, 0)
    with pytest.raises(ValueError, match="num_classes"):
        VisionPretrainModule(VISION, num_classes=0)
    with pytest.raises(ValueError, match="model.optim.vision_lr_scale has no effect in stage 0"):
        VisionPretrainModule(VISION, num_classes=3, optim=OptimConfig(vision_lr_scale=0.1))
    with pytest.raises(ValueError, match="model.optim.vision_router_lr_scale has no effect in stage 0"):
        VisionPretrainModule(VISION, num_classes=3, optim=OptimConfig(vision_router_lr_scale=1.0))
    boxed = VisionPretrainModule(VISION, num_classes=3, box_loss=1.0)
    boxed.log = module.log
    with pytest.raises(ValueError, match="model.box_loss.*data.patch_grid"):
        boxed.training_step({k: v for k, v in batch.items() if k != "patch_boxes"}, 0)
    with pytest.raises(ValueError, match="model.word_loss > 0 needs model.class_names"):
        VisionPretrainModule(VISION, num_classes=3, word_loss=1.0)
    with pytest.raises(ValueError, match="no word occurs in two class names"):
        VisionPretrainModule(VISION, num_classes=3, word_loss=1.0, class_names=["cat", "dog", "traffic light"])
    worded = VisionPretrainModule(VISION, num_classes=3, word_loss=1.0, class_names=NAMES)
    worded.log = module.log
    with pytest.raises(ValueError, match="model.word_loss.*data.patch_grid"):
        worded.training_step({k: v for k, v in batch.items() if k != "patch_targets"}, 0)


def test_export_loads_into_the_moe_tower_with_the_dense_features(tmp_path):
    module = VisionPretrainModule(VISION, num_classes=3).eval()
    path = module.export(tmp_path / "export")
    assert (tmp_path / "export" / "vision_config.json").is_file()
    moe_cfg = VisionConfig(**{**VISION.__dict__, "moe": MoEConfig(num_experts=4, top_k=2), "moe_layers": "all",
                              "checkpoint": str(path)})
    tower = build_vision_encoder(moe_cfg).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(tower(x)[0], module.encoder(x)[0], rtol=1e-5, atol=1e-5)


def test_the_stage0_cli_links_the_class_names_that_word_loss_needs(tiny_data, tmp_path):
    import csv
    import json

    from conftest import REPO

    from mmoe.training.vision_pretrain import cli_main, shared_name_words

    cli = cli_main(["fit", "--config", str(REPO / "configs/stages/stage0_vision.yaml"),
                    "--data.data_dir", str(tiny_data),
                    "--model.word_loss", "1.0", "--model.labels", "words", "--model.vision.dim", "32", "--model.vision.depth", "1",
                    "--model.vision.n_heads", "2", "--trainer.max_steps", "2", "--trainer.val_check_interval", "2",
                    "--trainer.limit_val_batches", "1", "--trainer.log_every_n_steps", "1",
                    "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
                    "--trainer.default_root_dir", str(tmp_path)])
    names = [c["name"] for c in json.loads((tiny_data / "train_instances.json").read_text())["categories"]]
    assert cli.model.words == shared_name_words(names) and {"red", "circle"} <= set(cli.model.words)
    assert cli.model.head.fc2.out_features == len(cli.model.words)  # labels: words
    rows = list(csv.DictReader(open(tmp_path / "metrics.csv")))
    assert any(r.get("train/word_loss") for r in rows) and any(r.get("val/word_loss") for r in rows)
    assert (tmp_path / "export" / "vision.safetensors").is_file()
