"""Incremental detokenization and stop strings, on a real byte-level BPE tokenizer built offline."""

from __future__ import annotations

import random

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from strata.app.output.detokenizer import IncrementalDetokenizer, StopChecker, find_stop, releasable_len

EOS = "<|eos|>"
WORDS = [
    "hello", "world", "the", "quick", "brown", "fox", "café", "naïve", "résumé", "Zürich", "señor",
    "crème", "brûlée", "日本語", "東京", "中文", "漢字", "テキスト", "한국어", "😀", "🎉", "🚀", "👍🏽",
    "x=1;", "print()", "ok.", "Ελληνικά", "Привет", "∑∫√",
]
SAMPLES = [
    "hello 日本語 world 😀🎉 café",
    "Zürich 東京 🚀🚀 naïve crème brûlée",
    "Привет, 漢字! 👍🏽 ok. résumé 한국어",
    "∑∫√ テキスト señor 🎉x=1; 中文中文",
]


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    rng = random.Random(0)
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) for _ in range(400)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    # A small vocabulary keeps many multi-byte characters split over several tokens.
    trainer = trainers.BpeTrainer(
        vocab_size=330, special_tokens=[EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(lines, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, clean_up_tokenization_spaces=False)


def _ids(tokenizer: PreTrainedTokenizerFast, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def test_tokenizer_really_splits_characters(tokenizer) -> None:
    pieces = [tokenizer.decode([i]) for i in _ids(tokenizer, " ".join(SAMPLES))]
    assert any("\ufffd" in p for p in pieces), "the test needs characters split across tokens"


@pytest.mark.parametrize("sample", SAMPLES)
def test_incremental_equals_full_decode(tokenizer, sample: str) -> None:
    ids = _ids(tokenizer, sample)
    detok = IncrementalDetokenizer(tokenizer, prompt_token_ids=[])
    released = ""
    for n, token in enumerate(ids, start=1):
        new = detok.step(token)
        released += new
        assert "\ufffd" not in new
        full = tokenizer.decode(ids[:n])
        if not full.endswith("\ufffd"):
            assert released == full
        else:
            assert full.startswith(released)  # a split character is held, never released broken
    assert released == sample


@pytest.mark.parametrize("sample", SAMPLES)
def test_prompt_context_and_leading_space(tokenizer, sample: str) -> None:
    ids = _ids(tokenizer, "some prompt 東京 " + sample)
    checked = 0
    for cut in range(1, len(ids)):
        prompt, output = ids[:cut], ids[cut:]
        if "\ufffd" in tokenizer.decode(output):
            continue  # the cut splits a character: the output alone has no clean decode
        detok = IncrementalDetokenizer(tokenizer, prompt)
        text = ""
        for n, token in enumerate(output, start=1):
            new = detok.step(token)
            assert "\ufffd" not in new
            text += new
            full = tokenizer.decode(output[:n])
            if not full.endswith("\ufffd"):
                assert text == full
        assert text == tokenizer.decode(output)
        checked += 1
    assert checked > len(ids) // 2


def test_special_tokens(tokenizer) -> None:
    ids = _ids(tokenizer, "hello 日本") + [tokenizer.eos_token_id]
    skip = IncrementalDetokenizer(tokenizer, [], skip_special_tokens=True)
    keep = IncrementalDetokenizer(tokenizer, [], skip_special_tokens=False)
    skipped = "".join(skip.step(token) for token in ids)
    kept = "".join(keep.step(token) for token in ids)
    assert skipped == tokenizer.decode(ids, skip_special_tokens=True) == "hello 日本"
    assert kept == tokenizer.decode(ids, skip_special_tokens=False) == "hello 日本" + EOS


def test_detokenizer_keeps_no_copy_of_ids_or_text(tokenizer) -> None:
    # The output processor owns a completion's ids and text; the detokenizer only decodes.
    detok = IncrementalDetokenizer(tokenizer, [])
    detok.step(_ids(tokenizer, "hello")[0])
    assert not hasattr(detok, "output_token_ids") and not hasattr(detok, "text")


def _stream_with_stops(tokenizer, text: str, stop: list[str], include: bool) -> tuple[str, str | None, str]:
    """Drive detokenizer + StopChecker as the output processor does; return (final text, stop,
    streamed text)."""
    detok = IncrementalDetokenizer(tokenizer, [])
    checker = StopChecker(stop, include)
    streamed = so_far = ""
    for token in _ids(tokenizer, text):
        new = detok.step(token)
        so_far += new
        final, matched = checker.check(so_far, len(new))
        if matched is not None:
            assert final.startswith(streamed), "released text was taken back"
            return final, matched, streamed + final[len(streamed):]
        release = so_far[: checker.releasable_len(so_far)]
        assert release.startswith(streamed), "released text was taken back"
        streamed = release
    return so_far, None, streamed + so_far[len(streamed):]


@pytest.mark.parametrize("include", [False, True])
@pytest.mark.parametrize(
    "text, stop, expected_stop",
    [
        ("hello 日本語 world 😀🎉 café", ["日本語"], "日本語"),
        ("hello 日本語 world 😀🎉 café", ["🎉 ca", "nomatch"], "🎉 ca"),
        ("Zürich 東京 🚀🚀 naïve", ["ï", "東京"], "東京"),  # earliest match wins
        ("Привет, 漢字! 👍🏽 ok.", ["ok."], "ok."),
        ("crème brûlée", ["zzz"], None),
    ],
)
def test_stop_strings_across_tokens(tokenizer, text, stop, expected_stop, include) -> None:
    final, matched, streamed = _stream_with_stops(tokenizer, text, stop, include)
    assert matched == expected_stop
    if expected_stop is None:
        assert final == text
    else:
        at = text.find(expected_stop)
        assert final == (text[: at + len(expected_stop)] if include else text[:at])
    assert streamed == final


def test_find_stop_searches_only_near_new_text() -> None:
    # "STOP" lies wholly in old text: an earlier step would have caught it, so it is not re-found.
    assert find_stop("abcSTOPxyz", 3, ["STOP"], False) == ("abcSTOPxyz", None)
    assert find_stop("abcSTOPxyz", 4, ["STOP"], False) == ("abc", "STOP")  # touches new text
    assert find_stop("abcSTOPxyz", 7, ["STOP"], True) == ("abcSTOP", "STOP")
    assert find_stop("a b c", 0, ["b"], False) == ("a b c", None)
    assert find_stop("x--y==z", 7, ["==", "--"], False) == ("x", "--")


def test_releasable_len_holds_possible_stop_starts() -> None:
    assert releasable_len("say hello wo", ["world"], False) == len("say hello ")
    assert releasable_len("say hello wo", ["world", "o"], False) == len("say hello ")
    assert releasable_len("say hello wx", ["world"], False) == len("say hello wx")
    assert releasable_len("say hello wo", ["world"], True) == len("say hello wo")
    assert releasable_len("say hello wo", ["world"], False, finished=True) == len("say hello wo")
    assert releasable_len("ab", ["abc", "bcd"], False) == 0
    assert StopChecker(None).releasable_len("anything") == len("anything")
