"""The VLM: image tokens land exactly where the placeholders were, labels are masked on image and
prompt positions, modality ids follow, every parameter learns, and all MoE sites report routing."""

from __future__ import annotations

import pytest
import torch

from mmoe.constants import IGNORE_INDEX, MODALITY_IMAGE, MODALITY_TEXT
from mmoe.model.connector import ConnectorConfig
from mmoe.model.decoder import DecoderConfig
from mmoe.model.moe import MoEConfig
from mmoe.model.vision import VisionConfig
from mmoe.model.vlm import MMoEVLM, SpliceError, VLMConfig

IMG = 4


def tiny_vlm() -> MMoEVLM:
    torch.manual_seed(0)
    moe = MoEConfig(num_experts=4, top_k=2)
    cfg = VLMConfig(
        vision=VisionConfig(image_size=32, patch_size=16, dim=32, depth=2, n_heads=2, mlp_ratio=2.0, moe=moe,
                            moe_layers="all", feature_layer=-1),
        connector=ConnectorConfig(kind="moe_mlp", moe=moe),
        decoder=DecoderConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=1, hidden=64, max_seq_len=64,
                              ffn_moe=MoEConfig(num_experts=4, top_k=2, hierarchy="group_limited", num_groups=2,
                                                top_groups=1, num_shared_experts=1),
                              ffn_moe_layers="all", attn_moe=moe, attn_moe_layers="all"),
        image_token_id=IMG)
    return MMoEVLM(cfg)


def test_image_tokens_land_where_the_placeholders_were():
    model = tiny_vlm()
    P, D = 4, 32  # 32/16 = 2x2 patches, no pooling, no CLS
    assert model.num_image_tokens == P
    ids = torch.tensor([[1, IMG, 7, 8, IMG, 9, 0],     # two images, right-padded
                        [1, 10, IMG, 11, 12, 13, 14]])  # one image in the middle
    mask = ids != 0
    labels = torch.tensor([[-100, -100, -100, 8, -100, 9, -100],
                           [-100, -100, -100, -100, 12, 13, 14]])
    images = torch.randn(3, P, D)
    emb, m, lab, mod = model.splice(ids, mask, images, labels, "right")
    tok = model.decoder.embed_tokens
    assert emb.shape == (2, 7 + 2 * (P - 1), D)
    # row 0: [bos, img0 x4, 7, 8, img1 x4, 9, pad...]
    torch.testing.assert_close(emb[0, 1:5], images[0])
    torch.testing.assert_close(emb[0, 7:11], images[1])
    torch.testing.assert_close(emb[0, 5], tok.weight[7])
    torch.testing.assert_close(emb[0, 11], tok.weight[9])
    # row 1: [bos, 10, img2 x4, 11, 12, 13, 14, pad x3]
    torch.testing.assert_close(emb[1, 2:6], images[2])
    torch.testing.assert_close(emb[1, 9], tok.weight[14])
    assert m[0].tolist() == [True] * 12 + [False] and m[1].tolist() == [True] * 10 + [False] * 3
    assert (mod[0, 1:5] == MODALITY_IMAGE).all() and (mod[0, 7:11] == MODALITY_IMAGE).all()
    assert (mod[1, 2:6] == MODALITY_IMAGE).all() and int((mod == MODALITY_IMAGE).sum()) == 3 * P
    assert mod[0, 5] == MODALITY_TEXT
    # labels: IGNORE on every image position and where the text label was IGNORE; kept values move with text
    assert (lab[mod == MODALITY_IMAGE] == IGNORE_INDEX).all()
    assert lab[0, 6].item() == 8 and lab[0, 11].item() == 9 and lab[1, 7].item() == 12 and lab[1, 9].item() == 14
    assert int((lab != IGNORE_INDEX).sum()) == int((labels != IGNORE_INDEX).sum())


def test_left_padded_prompts_stay_left_padded():
    model = tiny_vlm()
    ids = torch.tensor([[0, 0, 1, IMG, 5], [1, IMG, 6, 7, 8]])
    emb, m, _, mod = model.splice(ids, ids != 0, torch.randn(2, 4, 32), None, "left")
    assert m[0].tolist() == [False] * 2 + [True] * 6 and m[1].tolist() == [True] * 8
    assert (mod[0, 3:7] == MODALITY_IMAGE).all() and (mod[1, 1:5] == MODALITY_IMAGE).all()


def test_placeholder_image_mismatch_is_a_clear_error():
    model = tiny_vlm()
    ids = torch.tensor([[1, IMG, 5]])
    with pytest.raises(SpliceError, match="1 '<image>' placeholders but 2 images"):
        model.splice(ids, ids != 0, torch.randn(2, 4, 32))


def test_every_parameter_gets_a_gradient_and_every_site_routes():
    model = tiny_vlm()
    ids = torch.tensor([[1, IMG, 7, 8, 9, 10], [1, IMG, 11, 12, 13, 0]])
    labels = ids.masked_fill(ids == IMG, IGNORE_INDEX)
    out = model(ids, ids != 0, torch.randn(2, 3, 32, 32), labels)
    sites = {r.site for r in out.routing}
    assert sites == {"vision", "connector", "attention", "ffn"}
    img_mask = out.modality == MODALITY_IMAGE
    ffn = next(r for r in out.routing if r.site == "ffn")
    assert torch.equal(ffn.modality.view(out.modality.shape), out.modality) and bool(img_mask.any())
    from mmoe.training.module import lm_loss
    aux = sum(torch.stack([r.probs.mean() for r in out.routing]))  # routers are trained by the aux losses
    (lm_loss(out.logits, out.labels) + aux).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not bool(p.grad.abs().sum() > 0)]
    assert not missing, missing


def test_text_only_batch_placeholder_image_changes_nothing_but_runs_every_site():
    """With always_encode_images (set under DDP / expert parallelism) a text-only batch still runs the vision
    side, on a masked blank image: same logits, vision/connector routing with no real tokens (no loss, no
    load), and a graph into the vision parameters so backward issues their collectives too."""
    from mmoe.model.moe import balancing

    model = tiny_vlm()
    ids = torch.tensor([[1, 7, 8, 9, 10], [1, 11, 12, 13, 0]])
    plain = model(ids, ids != 0)
    assert {r.site for r in plain.routing} == {"attention", "ffn"}
    model.always_encode_images = True
    out = model(ids, ids != 0)
    torch.testing.assert_close(out.logits, plain.logits, rtol=0, atol=0)
    vis = [r for r in out.routing if r.site in ("vision", "connector")]
    assert len(vis) == 3 and all(not r.token_mask.any() for r in vis)
    assert all(balancing.load_balance_loss(r).detach().item() == 0.0 and balancing.expert_load(r).sum() == 0 for r in vis)
    out.logits.float().pow(2).mean().backward()
    vision_grads = [p.grad for p in model.vision.parameters()]
    assert all(g is not None and float(g.abs().sum()) == 0.0 for g in vision_grads)
    with torch.no_grad():  # generation takes the same path
        new = model.generate(ids[:1], torch.ones(1, 5, dtype=torch.bool), max_new_tokens=2)
    assert new.shape == (1, 2)


def test_shared_prefix_packing_equals_asking_each_question_alone():
    """Segments after a shared image prefix compute exactly what each question computes alone (same tokens,
    positions restart after the prefix, no attention across segments); padding and a second row do not matter."""
    model = tiny_vlm().double().eval()
    torch.manual_seed(1)
    pix = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    prefix = [1, 20, IMG]
    q1, q2, q3 = [30, 31, 32, 33], [40, 41, 42], [50, 51, 52, 53, 54]
    packed = torch.tensor([prefix + q1 + q2 + q3, prefix + q2 + [0] * 9])
    seg = torch.tensor([[0, 0, 0] + [1] * 4 + [2] * 3 + [3] * 5, [0, 0, 0] + [1] * 3 + [0] * 9])
    with torch.no_grad():
        out = model(packed, packed != 0, pix, segment_ids=seg).logits
        P = model.num_image_tokens
        start = 3 + P - 1  # first question token after splicing
        for row, (q, offset) in [(0, (q1, 0)), (0, (q2, 4)), (0, (q3, 7)), (1, (q2, 0))]:
            alone = torch.tensor([prefix + q])
            ref = model(alone, alone != 0, pix[row:row + 1]).logits[0]
            got = out[row, start + offset:start + offset + len(q)]
            torch.testing.assert_close(got, ref[start:], rtol=1e-10, atol=1e-10)
        # without segment ids the later questions see the earlier ones: a different computation
        plain = model(packed, packed != 0, pix).logits
        assert not torch.allclose(plain[0, start + 4:start + 7], out[0, start + 4:start + 7])
