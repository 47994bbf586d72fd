"""Sampling through the streaming state (muse.generate): greedy decoding through the carried state
gives the argmax of a full forward over the text so far, for the transformer's KV cache and the
MUSE families' recurrent states; the top-k and top-p filters keep what they promise."""

import pytest
import torch

from muse import models
from muse.generate import Sampling, filtered_logits, generate, next_tokens

from .test_contract import build_tiny, ids_for

DECODERS = ["transformer", "phase1", "phase2", "phase3", "phase7", "phase8"]


@pytest.mark.parametrize("name", DECODERS)
def test_greedy_decoding_equals_the_argmax_of_full_forwards(name):
    model = build_tiny(name).eval()
    prompt = ids_for(7)[:2]
    made = torch.stack(list(generate(model, prompt, 6, Sampling(temperature=0))), dim=1)
    text = prompt
    with torch.no_grad():
        for step in range(6):
            best = model(text)[:, -1].argmax(-1)
            assert torch.equal(made[:, step], best), f"{name}: step {step} left the argmax"
            text = torch.cat((text, best[:, None]), dim=1)


def test_every_family_decodes():
    assert set(DECODERS) >= {n for n in models.default_names() if n != "transformer-eager"}


def test_a_seed_reproduces_a_sample_and_top_k_1_is_greedy():
    model = build_tiny("phase2").eval()
    prompt = ids_for(5)[:1]
    warm = Sampling(temperature=1.5)

    def run(sampling, seed):
        gen = torch.Generator().manual_seed(seed)
        return torch.cat(list(generate(model, prompt, 8, sampling, gen)))

    assert torch.equal(run(warm, 3), run(warm, 3))
    assert torch.equal(run(Sampling(temperature=0.7, top_k=1), 3), run(Sampling(0), 0))


def test_top_k_and_top_p_keep_the_promised_tokens():
    logits = torch.log(torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]], dtype=torch.float64))
    kept = lambda s: torch.isfinite(filtered_logits(logits, s))[0].tolist()  # noqa: E731
    assert kept(Sampling(top_k=2)) == [True, True, False, False, False]
    # the smallest set reaching 0.8: 0.5 + 0.2 = 0.7 < 0.8, so the third token joins
    assert kept(Sampling(top_p=0.8)) == [True, True, True, False, False]
    assert kept(Sampling(top_p=0.7)) == [True, True, False, False, False]
    assert kept(Sampling(top_p=0.01)) == [True, False, False, False, False]
    gen = torch.Generator().manual_seed(0)
    picks = {int(next_tokens(logits.expand(64, -1), Sampling(top_p=0.7), gen)[i])
             for i in range(64)}
    assert picks == {0, 1}


@pytest.mark.parametrize("kwargs, match", [
    ({"temperature": -1.0}, "temperature must be ≥ 0"),
    ({"top_k": -2}, "top_k must be an integer ≥ 0"),
    ({"top_k": 1.5}, "top_k must be an integer ≥ 0"),
    ({"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
    ({"top_p": 1.5}, r"top_p must be in \(0, 1\]"),
])
def test_bad_sampling_settings_name_the_value(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Sampling(**kwargs)


@pytest.mark.parametrize("prompt, steps, match", [
    (torch.zeros(3, dtype=torch.long), 2, "prompt must be"),
    (torch.zeros(1, 0, dtype=torch.long), 2, "prompt must be"),
    (torch.zeros(1, 3, dtype=torch.long), 0, "max_new_tokens must be an integer ≥ 1, got 0"),
])
def test_bad_prompt_or_length_is_refused(prompt, steps, match):
    with pytest.raises(ValueError, match=match):
        next(generate(build_tiny("transformer"), prompt, steps))


def test_a_model_that_does_not_stream_reruns_its_prefix():
    model = build_tiny("transformer").eval()

    class Stateless(torch.nn.Module):  # the fla peers' interface: logits of the whole text
        def forward(self, ids):
            return model(ids)

    prompt = ids_for(5)[:1]
    greedy = Sampling(temperature=0)
    assert torch.equal(torch.cat(list(generate(Stateless(), prompt, 4, greedy))),
                       torch.cat(list(generate(model, prompt, 4, greedy))))
