"""Synthetic preference benchmark: the oracle by hand, then the generator's statistics."""

from __future__ import annotations

import random
import statistics
from collections.abc import Iterator
from pathlib import Path

import pytest

from merger.preferences import read_preferences, write_preferences
from merger.recipe.prefdata import (
    FILLERS,
    ID_TEMPLATES,
    OOD_TEMPLATES,
    OPENERS,
    RUDE,
    SPLITS,
    TOPICS,
    WORDS,
    Features,
    PrefPair,
    features,
    generate,
    oracle,
    prompt_topic,
    sample_prompts,
    tokenize,
)

COOK = "How should I get started with baking bread?"
OVEN = "Preheat the oven fully before you bake anything."
SALT = "Salt the water well before you boil pasta."
KNIFE = "Keep your knife sharp so it cuts cleanly and safely."
DOUGH = "Let the dough rest so the bread rises evenly."
PASSPORT = "Check that your passport is valid for six months."
SILLY = "That is a silly question."


def keyword_hits(text: str) -> dict[str, int]:
    words = tokenize(text)
    return {t.name: sum(w in t.keywords for w in words) for t in TOPICS}


# --- the oracle, by hand ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        (f"{OVEN} {SALT} {PASSPORT}", 2 - 1),
        (f"{OVEN} {OVEN} {OVEN}", 1),  # repeats earn nothing
        (f"{OVEN} {SALT} {KNIFE} {DOUGH}", 3),  # capped at 3
        (f"Certainly! {OVEN} {SILLY}", 1 - 2),  # the opener is worth 0
        (f"{PASSPORT} {PASSPORT} {SILLY} {SILLY}", -1 - 1 - 2 - 2),  # penalties are not deduped
        ("oven salt pan dough.", 0),  # 4 words, all keywords: not informative, not off-topic
        ("oven salt pan with the rest of it", 1),  # 3 keywords in 8 words: informative
        ("oven passport.", 0),  # one cooking and one travel keyword: no topic
        (f"{FILLERS[0]} {FILLERS[1]}", 0),
        ("", 0),
        ("zxq 123 !!! ??? ... \x00 ñ", 0),
    ],
)
def test_oracle_by_hand(response: str, expected: float) -> None:
    assert oracle(COOK, response) == float(expected)


def test_oracle_without_a_prompt_topic_scores_only_rudeness() -> None:
    assert prompt_topic("qwerty?") is None
    assert oracle("qwerty?", f"{OVEN} {PASSPORT}") == 0.0
    assert oracle("", f"{OVEN} {SILLY}") == -2.0


def test_features_read_back_and_tokens_joined_by_spaces_read_the_same() -> None:
    text = f"Great question! {OVEN} {SALT} {PASSPORT} Honestly, figure it out yourself."
    assert features(COOK, text) == Features(on_topic=2, off_topic=1, rude=1, opener=True)
    assert features(COOK, f"{OVEN} Certainly!").opener is False  # only as the first sentence
    assert oracle(COOK, " ".join(tokenize(text))) == oracle(COOK, text) == -1.0


def test_oracle_is_total_on_random_word_salad() -> None:
    rng = random.Random(0)
    for _ in range(200):
        salad = " ".join(rng.choices(WORDS, k=rng.randint(0, 40)))
        assert isinstance(oracle(COOK, salad), float)


def test_pools_are_unambiguous() -> None:
    """Each topic sentence and prompt reads as its own topic only; neutral text as none."""
    for a in TOPICS:
        for b in TOPICS:
            assert a is b or not a.keywords & b.keywords, (a.name, b.name)
        for sentence in a.sentences:
            hits = keyword_hits(sentence)
            assert hits[a.name] >= 1 and sum(hits.values()) == hits[a.name], sentence
            assert features(f"Any advice on {a.subjects[0]}?", sentence).on_topic == 1, sentence
        for template in ID_TEMPLATES + OOD_TEMPLATES:
            for subject in a.subjects:
                assert prompt_topic(template.format(subject)) == a.name
    for text in (*OPENERS, *FILLERS, *RUDE, *ID_TEMPLATES, *OOD_TEMPLATES):
        assert sum(keyword_hits(text).values()) == 0, text
    assert all(features(COOK, r).rude == 1 for r in RUDE)


# --- the generator ----------------------------------------------------------------------


def test_generate_is_deterministic_and_seeds_and_splits_differ() -> None:
    first = generate("train", 50, seed=3)
    assert first == generate("train", 50, seed=3)
    assert generate("train", 20, seed=3) == first[:20]  # one sequential stream
    assert first != generate("train", 50, seed=4)
    train = {(p.prompt, p.chosen, p.rejected) for p in first}
    val = {(p.prompt, p.chosen, p.rejected) for p in generate("val", 50, seed=3)}
    assert len(train & val) < 5  # a few chance collisions at most, not the same list
    assert {p.split for p in first} == {"train"}


def test_clean_pairs_have_a_strict_oracle_gap_matching_the_texts() -> None:
    for split in SPLITS:
        for p in generate(split, 300, seed=1):
            assert not p.flipped and p.oracle_chosen > p.oracle_rejected
            assert (p.oracle_chosen, p.oracle_rejected) == (
                oracle(p.prompt, p.chosen),
                oracle(p.prompt, p.rejected),
            )


def test_label_noise_flips_a_quarter_and_only_swaps_clean_pairs() -> None:
    clean = generate("train", 2000, seed=0)
    noisy = generate("train", 2000, seed=0, noise=0.25)
    assert 0.22 <= sum(p.flipped for p in noisy) / len(noisy) <= 0.28
    for c, p in zip(clean, noisy, strict=True):
        assert (p.oracle_chosen < p.oracle_rejected) is p.flipped
        swapped = (p.rejected, p.chosen) if p.flipped else (p.chosen, p.rejected)
        assert (p.prompt, *swapped) == (c.prompt, c.chosen, c.rejected)


def cue_rates(pairs: list[PrefPair]) -> tuple[float, float]:
    """Fractions of pairs where only the chosen / only the rejected response has the opener."""
    feats = [(features(p.prompt, p.chosen), features(p.prompt, p.rejected)) for p in pairs]
    only_chosen = sum(c.opener and not r.opener for c, r in feats) / len(pairs)
    only_rejected = sum(r.opener and not c.opener for c, r in feats) / len(pairs)
    return only_chosen, only_rejected


def test_spurious_opener_follows_the_label_in_distribution_and_opposes_it_ood() -> None:
    # spurious_corr 0.8: P(only chosen) = 0.8 * 0.8 = 0.64, P(only rejected) = 0.2 * 0.2 = 0.04
    # in train and val; ood swaps the two. Chance (spurious_corr 0.5) is 0.25 for both.
    for split in ("train", "val"):
        only_chosen, only_rejected = cue_rates(generate(split, 1000, seed=0))
        assert only_chosen == pytest.approx(0.64, abs=0.05)
        assert only_rejected == pytest.approx(0.04, abs=0.03)
    only_chosen, only_rejected = cue_rates(generate("ood", 1000, seed=0))
    assert only_chosen == pytest.approx(0.04, abs=0.03)
    assert only_rejected == pytest.approx(0.64, abs=0.05)
    chance = cue_rates(generate("train", 1000, seed=0, spurious_corr=0.5))
    assert chance == pytest.approx((0.25, 0.25), abs=0.05)


def test_ood_shifts_templates_and_feature_distributions() -> None:
    def stats(split: str) -> tuple[float, float, float]:
        pairs = generate(split, 500, seed=0)
        responses = [(p.prompt, r) for p in pairs for r in (p.chosen, p.rejected)]
        feats = [features(q, r) for q, r in responses]
        return (
            statistics.mean(f.off_topic for f in feats),
            statistics.mean(f.rude for f in feats),
            statistics.mean(len(r.split()) for _, r in responses),
        )

    # Sampling: E[off-topic] = 0.5 in distribution, 1.0 ood; P(rude) 0.15 vs 0.3; ood adds
    # an on-topic sentence and filler. Tie rejection moves these only slightly.
    (off_id, rude_id, words_id), (off_ood, rude_ood, words_ood) = stats("train"), stats("ood")
    assert off_id == pytest.approx(0.5, abs=0.08) and off_ood == pytest.approx(1.0, abs=0.1)
    assert rude_id == pytest.approx(0.15, abs=0.05) and rude_ood == pytest.approx(0.3, abs=0.06)
    assert words_ood > words_id + 10
    ood_stems = {t.split("{}")[0] for t in OOD_TEMPLATES}
    for p in generate("ood", 100):
        assert any(p.prompt.startswith(s) for s in ood_stems)
    assert not any(p.prompt.startswith(tuple(ood_stems)) for p in generate("val", 100))


def test_responses_stay_short_and_within_the_vocabulary() -> None:
    words = set(WORDS)
    for split in SPLITS:
        for p in generate(split, 300, seed=2):
            for r in (p.chosen, p.rejected):
                assert 1 <= len(r.split()) <= 90
                assert set(tokenize(r)) <= words


def test_sample_prompts() -> None:
    prompts = sample_prompts(40, seed=5)
    assert prompts == sample_prompts(40, seed=5) != sample_prompts(40, seed=6)
    assert all(prompt_topic(q) is not None for q in prompts)
    ood_stems = tuple(t.split("{}")[0] for t in OOD_TEMPLATES)
    assert all(q.startswith(ood_stems) for q in sample_prompts(20, split="ood"))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"split": "test", "n": 1}, "unknown split 'test'"),
        ({"split": "train", "n": 0}, "n must be an integer >= 1"),
        ({"split": "train", "n": True}, "n must be an integer >= 1"),
        ({"split": "train", "n": 1, "noise": 0.5}, "noise must be in"),
        ({"split": "train", "n": 1, "noise": -0.1}, "noise must be in"),
        ({"split": "train", "n": 1, "spurious_corr": 1.5}, "spurious_corr must be in"),
    ],
)
def test_generate_rejects_bad_arguments(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        generate(**kwargs)  # type: ignore[arg-type]


def test_sample_prompts_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="n must be"):
        sample_prompts(0)
    with pytest.raises(ValueError, match="unknown split"):
        sample_prompts(1, split="dev")


# --- files ------------------------------------------------------------------------------


def test_jsonl_round_trip_and_the_diagnose_loader_reads_it(tmp_path: Path) -> None:
    pairs = generate("train", 30, seed=0, noise=0.2)
    path = write_preferences(pairs, tmp_path / "train.jsonl")
    assert read_preferences(path, PrefPair) == pairs
    prefs = read_preferences(path)
    assert [(q.prompt, q.chosen, q.rejected) for q in prefs] == [
        (p.prompt, p.chosen, p.rejected) for p in pairs
    ]
    assert [f.name for f in tmp_path.iterdir()] == ["train.jsonl"]


def test_write_preferences_is_atomic(tmp_path: Path) -> None:
    path = write_preferences(generate("val", 3), tmp_path / "val.jsonl")
    before = path.read_bytes()

    def failing() -> Iterator[PrefPair]:
        yield from generate("val", 5, seed=9)
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        write_preferences(failing(), path)
    assert path.read_bytes() == before
    assert [f.name for f in tmp_path.iterdir()] == ["val.jsonl"]


def test_read_preferences_names_the_bad_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    good = generate("train", 1)[0].model_dump_json()
    path.write_text(f"{good}\n\n{{not json\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.jsonl:3: invalid JSON"):
        read_preferences(path, PrefPair)
