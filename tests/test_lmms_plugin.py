"""lmms-eval plug-in: generate_until / loglikelihood against VLMPipeline and MMoEVLM.forward, registration."""

from __future__ import annotations

import importlib
import tomllib
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from mmoe.inference.lmms_plugin import HAVE_LMMS_EVAL, MMoELMMs, cut_at_stop

REPO = Path(__file__).resolve().parents[1]
Q = "What shape is the yellow object?\nAnswer the question using a single word or phrase."


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    from test_infer import make_tiny

    t = make_tiny(tmp_path_factory.mktemp("lmms"))
    model = MMoELMMs(pretrained=str(t["export"]), device="cpu", batch_size=1)
    docs = [{"image": Image.open(p).convert("RGB"), "question": Q} for p in t["images"][:3]]
    model.task_dict = {"toy": {"test": docs}}
    return model


def make_request(kind, args, i):
    if HAVE_LMMS_EVAL:
        from lmms_eval.api.instance import Instance

        return Instance(request_type=kind, arguments=args, idx=0,
                        metadata={"task": "toy", "doc_id": i, "repeats": 1})
    return SimpleNamespace(request_type=kind, args=args)


def doc_to_visual(doc):
    return [doc["image"]]


def test_is_a_real_lmms_subclass_when_the_harness_is_installed():
    if not HAVE_LMMS_EVAL:
        pytest.skip("lmms-eval not installed: the class uses the stand-in base")
    from lmms_eval.api.model import lmms

    assert issubclass(MMoELMMs, lmms) and MMoELMMs.is_simple


def test_generate_until_equals_pipeline_in_request_order(lm):
    pipe = lm.pipe
    g_short = {"max_new_tokens": 4, "temperature": 0, "until": ["ASSISTANT:"]}
    g_long = {"max_new_tokens": 7, "do_sample": False}
    reqs = [make_request("generate_until", (Q, dict(g_short), doc_to_visual, 0, "toy", "test"), 0),
            make_request("generate_until", ("Describe the image briefly.", dict(g_long), doc_to_visual, 1, "toy",
                                            "test"), 1),
            make_request("generate_until", (Q, dict(g_short), doc_to_visual, 2, "toy", "test"), 2)]
    out = lm.generate_until(reqs)
    docs = lm.task_dict["toy"]["test"]
    expected = [pipe.generate([[docs[0]["image"]]], [Q], max_new_tokens=4)[0],
                pipe.generate([[docs[1]["image"]]], ["Describe the image briefly."], max_new_tokens=7)[0],
                pipe.generate([[docs[2]["image"]]], [Q], max_new_tokens=4)[0]]
    assert out == expected
    # `until` cuts at the first stop string
    first_word = expected[1].split()[1] if len(expected[1].split()) > 1 else None
    if first_word:
        reqs2 = [make_request("generate_until", ("Describe the image briefly.", {**g_long, "until": [first_word]},
                                                 doc_to_visual, 1, "toy", "test"), 1)]
        assert lm.generate_until(reqs2) == [expected[1][: expected[1].index(first_word)].strip()]
    assert cut_at_stop("a b. c", [".", "b"]) == "a "


def test_loglikelihood_equals_forward_log_softmax_sum(lm):
    from mmoe.data.template import build_prompt

    pipe, tok, model = lm.pipe, lm.pipe.tokenizer, lm.pipe.model
    doc = lm.task_dict["toy"]["test"][0]
    continuation = "red diamond"
    reqs = [make_request("loglikelihood", (Q, continuation, doc_to_visual, 0, "toy", "test"), 0),
            make_request("loglikelihood", (Q, lambda d: "circle", doc_to_visual, 0, "toy", "test"), 0)]
    (lp, greedy), (lp2, _) = lm.loglikelihood(reqs)

    # by hand: <bos>USER: <image>\n{Q} ASSISTANT: + continuation tokens, one forward, log-softmax, sum
    ctx = build_prompt(tok, "<image>\n" + Q)
    cont = tok.encode(continuation, add_special_tokens=False)
    ids = torch.tensor([ctx + cont])
    pixels = pipe._pixels([doc["image"]])
    with torch.no_grad():
        logits = model(ids, torch.ones_like(ids, dtype=torch.bool), pixels).logits[0].float()
    P = model.num_image_tokens
    start = len(ctx) - 1 + P  # expanded position of the first continuation token
    logp = logits.log_softmax(-1)
    by_hand = sum(float(logp[start - 1 + j, cont[j]]) for j in range(len(cont)))
    greedy_by_hand = all(int(logits[start - 1 + j].argmax()) == cont[j] for j in range(len(cont)))
    assert len(cont) == 2 and lp < 0
    assert lp == pytest.approx(by_hand, rel=1e-5, abs=1e-5)
    assert greedy == greedy_by_hand
    assert lp2 < 0 and lp2 != pytest.approx(lp)
    # the greedy flag is True for the model's own greedy answer; an answer is only text if its 3 tokens survive
    # decoding (this random model may emit special tokens, which decoding drops), so use the first doc where they do
    docs = lm.task_dict["toy"]["test"]
    owned = [(i, own) for i, d in enumerate(docs)
             for own in pipe.generate([[d["image"]]], [Q], max_new_tokens=3)
             if len(tok.encode(own, add_special_tokens=False)) == 3]
    assert owned, "no doc gave a 3-token text answer"
    i, own = owned[0]
    (_, g_own), = lm.loglikelihood([make_request("loglikelihood", (Q, own, doc_to_visual, i, "toy", "test"), i)])
    assert g_own
    # 'loss' output (for multiple_choice tasks, which take argmin): mean NLL per continuation token
    lm.loglikelihood_output = "loss"
    try:
        (loss, _), = lm.loglikelihood(reqs[:1])
    finally:
        lm.loglikelihood_output = "logprob"
    assert loss == pytest.approx(-by_hand / len(cont), rel=1e-5)
    with pytest.raises(NotImplementedError):
        lm.generate_until_multi_round(reqs)


def test_registration_manifest_and_entry_point():
    """The entry point pyproject.toml declares resolves to the manifest, which registers MMoELMMs as 'mmoe'."""
    eps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["entry-points"]["lmms_eval.models"]
    assert eps == {"mmoe": "mmoe.inference.lmms_plugin:manifest"}
    module, _, attr = eps["mmoe"].partition(":")
    manifest = getattr(importlib.import_module(module), attr)
    if not HAVE_LMMS_EVAL:
        pytest.skip("lmms-eval not installed")
    from lmms_eval.models.registry_v2 import ModelRegistryV2

    reg = ModelRegistryV2()
    for m in reg._coerce_payload_to_manifests(manifest):
        reg.register_manifest(m)
    assert reg.get_model_class("mmoe") is MMoELMMs


def test_create_from_arg_string_and_bad_dir(lm, tmp_path):
    export = lm.pipe.model  # noqa: F841 - model already loaded; build a second one from args
    with pytest.raises(FileNotFoundError, match="not found"):
        MMoELMMs.create_from_arg_string(f"pretrained={tmp_path / 'nope'}", {"batch_size": 2, "device": "cpu"})
    other = MMoELMMs(pipeline=lm.pipe, batch_size="2")
    assert other.batch_size == 2 and other.loglikelihood_output == "logprob"
