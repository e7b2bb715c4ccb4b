"""The exact ids the model is conditioned on at inference, as the release's pipeline
(modules/pipeline.py) builds them, for a pipeline folder whose tokenizer pads with neither
`</s>` nor id 0:

* text-to-image: `tokenizer(prompt, padding="max_length", max_length=256)` — the prompt's
  pieces, `</s>`, then the folder's own pad token (training pads with `</s>` instead);
* VQA: the prompt's pieces and its `</s>` stay fixed at the start, every other position
  starts as the mask id (`_sample_prior`: the zero padding is masked, never seen), and the
  whole sequence is decoded with `</s>` removed; `.answer` is what follows the prompt.

Expected ids come from the tokenizer's own pieces and the folder's tokenizer config,
never from our tokenising helpers; the ids are read where they enter the T5 (spies).
"""

import dataclasses
import json
import os

import jax
import numpy as np
import pytest

from test_sampling_pipeline import RES, picture, tiny_components
from unialign_jax.checkpoints.pipeline_folder import TrainedWith
from unialign_jax.sampling import unialign_pipeline as pipeline_module
from unialign_jax.sampling.unialign_pipeline import UniAlignPipeline

FOLDER_PAD = "<extra_id_7>"   # neither </s> (1) nor <pad> (0): a loader ignoring it shows
QUESTION = "what color is the cube"
LENGTH = 40


@pytest.fixture(scope="module")
def folder_pipe(tmp_path_factory):
    """A converted pipeline folder written with a tokenizer whose pad token is FOLDER_PAD,
    loaded back the way users load one (`from_pretrained`)."""
    root = tmp_path_factory.mktemp("text_ids")
    components = tiny_components(root / "tok")
    components.tokenizer.pad_token = FOLDER_PAD
    UniAlignPipeline(components, progress=False).save_pretrained(str(root / "pipe"))
    return UniAlignPipeline.from_pretrained(str(root / "pipe"), batch_size=2, progress=False)


def folder_pad_id(pipe) -> int:
    """The pad id named by the folder's own tokenizer config."""
    tok = pipe.components.tokenizer
    with open(os.path.join(pipe.components.path, "tokenizer", "tokenizer_config.json")) as f:
        pad = json.load(f)["pad_token"]
    pad = pad["content"] if isinstance(pad, dict) else pad
    assert pad == FOLDER_PAD
    return tok.convert_tokens_to_ids(pad)


def pieces_and_eos(tok, text: str) -> list[int]:
    """The text's SentencePiece pieces as ids, then `</s>` (what T5 appends)."""
    return tok.convert_tokens_to_ids(tok.tokenize(text)) + [tok.convert_tokens_to_ids("</s>")]


def t5_inputs_of_generate(pipe, monkeypatch, prompts, negative_prompt):
    """(negative ids, positive ids) as they enter the T5 during `pipe.generate`."""
    t5_inputs = []
    real_call = pipe._module_call

    def spy(module, method, *args):
        if module is pipe.components.t5:
            t5_inputs.append(np.asarray(args[0]))
        return real_call(module, method, *args)

    monkeypatch.setattr(pipe, "_module_call", spy)
    pipe.generate(prompts, negative_prompt=negative_prompt, height=RES, width=RES,
                  num_steps=1)
    negative, positive = t5_inputs  # the negative prompt is encoded first, once
    return negative, positive


def test_text_to_image_prompts_are_padded_with_the_folders_pad_token(folder_pipe,
                                                                        monkeypatch):
    tok = folder_pipe.components.tokenizer
    pad = folder_pad_id(folder_pipe)
    assert pad not in (0, 1, tok.convert_tokens_to_ids("</s>"))
    prompts = ["a red cube on a table", "a photo of a cat"]
    negative, positive = t5_inputs_of_generate(folder_pipe, monkeypatch, prompts, "a dog")
    for text, ids in [("a dog", negative[0])] + list(zip(prompts, positive)):
        head = pieces_and_eos(tok, text)
        expected = head + [pad] * (256 - len(head))
        assert ids.tolist() == expected, text


def test_prompts_are_padded_to_the_length_the_model_was_trained_with(tmp_path, monkeypatch):
    """A model trained on 12-token prompts (the folder records it) is conditioned on 12
    ids, not the release's 256: a text stream of mostly padding is not what it learned."""
    components = dataclasses.replace(tiny_components(tmp_path / "tok"),
                                     trained_with=TrainedWith(text_length=12))
    UniAlignPipeline(components, progress=False).save_pretrained(str(tmp_path / "pipe"))
    pipe = UniAlignPipeline.from_pretrained(str(tmp_path / "pipe"), progress=False)
    tok = pipe.components.tokenizer
    pad = tok.convert_tokens_to_ids(tok.pad_token)
    negative, positive = t5_inputs_of_generate(pipe, monkeypatch, ["a red cube"], " ")
    head = pieces_and_eos(tok, "a red cube")
    assert positive[0].tolist() == head + [pad] * (12 - len(head))
    assert negative.shape[-1] == 12
    # captions default to the same number of positions
    DENOISER_INPUTS.clear()
    monkeypatch.setattr(pipeline_module, "ModelDenoiser", SpyDenoiser)
    (caption,) = pipe.caption([picture(1)], resolution=RES, num_steps=2)
    assert caption.ids.shape == (12,) and DENOISER_INPUTS[0].shape[-1] == 12


DENOISER_INPUTS: list[np.ndarray] = []


@dataclasses.dataclass(frozen=True)
class SpyDenoiser(pipeline_module.ModelDenoiser):
    """The pipeline's denoiser, reporting every id sequence fed to its T5."""

    def __call__(self, params, ids):
        jax.debug.callback(lambda x: DENOISER_INPUTS.append(np.asarray(x)), ids)
        return super().__call__(params, ids)


def test_vqa_keeps_the_prompt_and_its_eos_then_masks_and_decodes_the_whole_sequence(
        folder_pipe, monkeypatch):
    tok = folder_pipe.components.tokenizer
    mask = folder_pipe.components.mask_token_id
    assert mask == tok.convert_tokens_to_ids("<extra_id_0>")
    prompt = pieces_and_eos(tok, QUESTION)
    expected_start = prompt + [mask] * (LENGTH - len(prompt))
    outputs = []
    real_sample = pipeline_module.sample_caption

    def spy_sample(*args, **kwargs):
        out = real_sample(*args, **kwargs)
        outputs.append(np.asarray(out.ids))
        return out

    DENOISER_INPUTS.clear()
    monkeypatch.setattr(pipeline_module, "ModelDenoiser", SpyDenoiser)
    monkeypatch.setattr(pipeline_module, "sample_caption", spy_sample)
    answers = folder_pipe.caption([picture(1), picture(2)], prompt=QUESTION,
                                  resolution=RES, length=LENGTH, num_steps=3, seed=[5, 6])

    # The first forward sees exactly the prompt (with its </s>) and masks: no pad.
    rows = [row for x in DENOISER_INPUTS for row in x]
    first = max(rows, key=lambda row: int((row == mask).sum()))
    assert first.tolist() == expected_start
    for x in DENOISER_INPUTS:  # the prompt never changes while the rest is unmasked
        assert (x[:, :len(prompt)] == prompt).all()

    (ids,) = outputs
    for row, answer in zip(ids, answers):
        assert row[:len(prompt)].tolist() == prompt and mask not in row.tolist()
        assert answer.ids.tolist() == row.tolist()
        # The release: tokenizer.decode(pred[0]).replace('</s>', ''), prompt included.
        assert str(answer) == tok.decode(row.tolist()).replace("</s>", "")
        assert answer.answer == tok.decode(row[len(prompt):].tolist()).replace("</s>", "")
        assert str(answer).startswith(tok.decode(prompt[:-1]))
