"""Instruction following: every instruction id passes and fails where IFEval / IFEvalG say, relations at their
boundary, unknown ids and missing kwargs raise, strict / loose and binary / fraction modes."""

import threading

import pytest

import tasks

# id -> (kwargs, an answer that follows it, an answer that does not)
CASES = {
    # IFEval
    "keywords:existence": ({"keywords": ["cat", "Dog"]}, "My cat and my DOG.", "My cat only."),
    "keywords:frequency": ({"keyword": "sun", "frequency": 2, "relation": "at least"}, "sun and sunny", "one sun"),
    "keywords:forbidden_words": ({"forbidden_words": ["rain"]}, "Rainbows are nice.", "I like the RAIN."),
    "keywords:letter_frequency": ({"letter": "z", "let_frequency": 2, "let_relation": "at least"}, "Zig zag", "zag"),
    "language:response_language": ({"language": "es"}, "El perro come la comida en la casa grande con su familia.",
                                   "The dog eats the food in the big house with his family."),
    "length_constraints:number_sentences": ({"num_sentences": 2, "relation": "at least"}, "One. Two!", "Just one."),
    "length_constraints:number_paragraphs": ({"num_paragraphs": 2}, "First part.\n***\nSecond part.",
                                             "First.\n***\n\n***\nSecond."),
    "length_constraints:number_words": ({"num_words": 3, "relation": "less than"}, "two words", "three words here"),
    "length_constraints:nth_paragraph_first_word": ({"num_paragraphs": 2, "nth_paragraph": 2, "first_word": "then"},
                                                    'First one.\n\n"Then, the second.', "First.\n\nAnd then more."),
    "detectable_content:number_placeholders": ({"num_placeholders": 2}, "[name] lives at [address].", "[name] only"),
    "detectable_content:postscript": ({"postscript_marker": "P.S."}, "Hello.\np.s. see you", "Hello. PS see you"),
    "detectable_format:number_bullet_lists": ({"num_bullets": 2}, "* one\n* two", "* one\n* two\n- three"),
    "detectable_format:constrained_response": ({}, "Well. My answer is maybe.", "Maybe."),
    "detectable_format:number_highlighted_sections": ({"num_highlights": 2}, "*one* and **two**", "*one* and ** **"),
    "detectable_format:multiple_sections": ({"section_spliter": "Section", "num_sections": 2},
                                            "Section 1\nabc\nSection 2\ndef", "Section 1\nabc"),
    "detectable_format:json_format": ({}, '```json\n{"a": [1, 2]}\n```', "{a: 1}"),
    "detectable_format:title": ({}, "<<Poem of Joy>>\nla la", "<< >> no title"),
    "combination:two_responses": ({}, "Answer one.\n******\nAnswer two.", "Same.\n******\nSame."),
    "combination:repeat_prompt": ({"prompt_to_repeat": "Write a poem."}, "write a poem. Roses are red.",
                                  "Sure! Write a poem."),
    "startend:end_checker": ({"end_phrase": "Any other questions?"}, 'Done. any other questions?"',
                             "Any other questions? Done."),
    "change_case:capital_word_frequency": ({"capital_frequency": 2, "capital_relation": "at least"},
                                           "THIS is VERY good", "THIS is good"),
    "change_case:english_capital": ({}, "THE DOG RUNS IN THE PARK EVERY MORNING WITH ITS OWNER.",
                                    "EL PERRO COME LA COMIDA EN LA CASA GRANDE CON SU FAMILIA."),
    "change_case:english_lowercase": ({}, "the dog runs in the park every morning with its owner.",
                                      "the dog runs in the park every morning with its Owner."),
    "punctuation:no_comma": ({}, "no commas here", "one, two"),
    "startend:quotation": ({}, ' "all quoted" ', '"half quoted'),
    # open-instruct IFEvalG
    "copy:repeat_phrase": ({"phrase": "The early bird catches the worm", "small_n": 2},
                           "The early cat catches the worm and The early dog catches the worm",
                           "The early bird catches the worm and The early bird catches the worm"),
    "copy:copy": ({"prompt_to_repeat": "Say hi."}, "  say HI. ", "Say hi. Hi!"),
    "new:copy_span_idx": ({"prompt_to_repeat": "abcdefgh", "n_start": 2, "n_end": 5}, "CDE", "cdef"),
    "detectable_format:sentence_hyphens": ({}, "I am here.-You are there.", "I am here. - You are there."),
    "keywords:no_adjacent_consecutive": ({}, "cat fish", "apple banana"),
    "detectable_format:square_brackets": ({}, "[hello] [world]", "[hello] world"),
    "keywords:word_once": ({"keyword": "moon"}, "the Moon rises", "moon after moon"),
    "keywords:word_count_different_numbers": ({"keyword": "sun", "frequency": 2, "relation": "less than"},
                                              "one sun", "sun, sun"),
    "keywords:exclude_word_harder": ({"keyword": "red"}, "red apples", "a red apple"),
    "paragraphs:paragraphs": ({}, "one\n***\ntwo", "just one"),
    "paragraphs:paragraphs2": ({}, "one\n\ntwo", "one\n\ntwo\n\nthree"),
    "first_word:first_word_sent": ({"first_word": "we"}, "We go. We stay.", "We go. They stay."),
    "first_word:first_word_answer": ({"first_word": "hello"}, "Hello there", "Hi, hello"),
    "last_word:last_word_sent": ({"last_word": "now"}, "Go now. Stop now!", "Go now. Stop later."),
    "last_word:last_word_answer": ({"last_word": "end"}, "This is the end.", "The end is near."),
    "detectable_format:bigram_wrapping": ({}, "<<I am>> <<at home>>", "<<I am>> at home"),
    "copy:copying_simple": ({"prompt_to_repeat": "Tell me a joke."}, "tell me a joke.", "Tell me a joke. Ha"),
    "copy:copying_multiple": ({"prompt_to_repeat": "Hi there.", "N": 2}, "Hi there.\n******\nhi there.", "Hi there."),
    "punctuation:punctuation_dot": ({}, "no dots at all", "a dot."),
    "punctuation:punctuation_exclamation": ({}, "calm words", "wow!"),
    "count:lowercase_counting": ({"N": 2}, "Only TWO words", "one two three"),
    "letters:letter_counting": ({"N": 5, "relation": "less than"}, "abcd 123", "abcde"),
    "letters:letter_counting2": ({"letter": "a", "let_frequency": 2, "let_relation": "at least"}, "banana", "bed"),
    "count:counting_composition": ({"n_sent": 2, "n_words": 3},
                                   "I am. You are.\n***\nWe go. They run.\n***\nIt is. He was.",
                                   "I am. You are.\n***\nWe go. They run."),
    "count:count_unique": ({}, "one two three", "one two one"),
    "count:count_increment_word": ({"keyword1": "cat", "keyword2": "dog"}, "cat dog dog", "cat cat dog dog"),
    "keywords:palindrome": ({}, "racecar go", "hello world"),
    "keywords:keyword_specific_position": ({"keyword": "blue", "n": 2, "m": 3}, "First one. The sky blue is.",
                                           "First one. The blue sky."),
    "keywords:start_end": ({}, "Hello world hello", "Hello world hello."),
}


def test_every_registered_instruction_has_cases():
    assert set(CASES) == set(tasks.INSTRUCTIONS)
    assert len(tasks.INSTRUCTIONS) == 25 + 29


@pytest.mark.parametrize("instruction_id", sorted(CASES))
def test_instruction_passes_and_fails(instruction_id):
    kwargs, good, bad = CASES[instruction_id]
    assert tasks.check_instruction(instruction_id, good, kwargs) is True
    assert tasks.check_instruction(instruction_id, bad, kwargs) is False
    # through reward(), after the thought
    example = {"domain": "if", "messages": [], "instruction_id_list": [instruction_id], "kwargs": [kwargs]}
    assert tasks.reward(example, f"<think>\nok\n</think>\n{good}") == 1.0
    assert tasks.reward(example, f"<think>\nok\n</think>\n{bad}") == 0.0
    assert tasks.reward(example, f"<think>\nnever closed {good}") == 0.0


# id -> (kwargs for a threshold and relation, text with a given count)
RELATIONS = {
    "keywords:frequency": (lambda t, r: {"keyword": "sun", "frequency": t, "relation": r}, lambda n: "sun " * n + "x"),
    "keywords:word_count_different_numbers": (lambda t, r: {"keyword": "sun", "frequency": t, "relation": r},
                                              lambda n: "sun " * n + "x"),
    "keywords:letter_frequency": (lambda t, r: {"letter": "z", "let_frequency": t, "let_relation": r},
                                  lambda n: "z" * n + " ok"),
    "letters:letter_counting2": (lambda t, r: {"letter": "Z", "let_frequency": t, "let_relation": r},
                                 lambda n: "z" * n + " ok"),
    "length_constraints:number_sentences": (lambda t, r: {"num_sentences": t, "relation": r},
                                            lambda n: " ".join(["It is."] * n)),
    "length_constraints:number_words": (lambda t, r: {"num_words": t, "relation": r}, lambda n: " ".join(["w"] * n)),
    "change_case:capital_word_frequency": (lambda t, r: {"capital_frequency": t, "capital_relation": r},
                                           lambda n: " ".join(["BIG"] * n + ["small"])),
    "letters:letter_counting": (lambda t, r: {"N": t, "relation": r}, lambda n: "a" * n + " 12"),
}


@pytest.mark.parametrize("instruction_id", sorted(RELATIONS))
def test_relations_at_their_boundary(instruction_id):
    kwargs, text = RELATIONS[instruction_id]
    t = 3
    assert tasks.check_instruction(instruction_id, text(t - 1), kwargs(t, "less than")) is True
    assert tasks.check_instruction(instruction_id, text(t), kwargs(t, "less than")) is False  # strict
    assert tasks.check_instruction(instruction_id, text(t), kwargs(t, "at least")) is True    # inclusive
    assert tasks.check_instruction(instruction_id, text(t - 1), kwargs(t, "at least")) is False
    with pytest.raises(ValueError, match="relation"):
        tasks.check_instruction(instruction_id, text(t), kwargs(t, "at most"))


def test_unknown_instruction_id_raises_naming_it():
    with pytest.raises(ValueError, match="unknown instruction id 'made:up'"):
        tasks.if_reward(["punctuation:no_comma", "made:up"], [{}, {}], "fine")


def test_missing_kwargs_raise_naming_them():
    with pytest.raises(ValueError, match=r"needs kwargs \['end_phrase'\]"):
        tasks.check_instruction("startend:end_checker", "text", {})
    # unknown extra keys (builder-only ones in the released data) are ignored
    assert tasks.check_instruction("punctuation:no_comma", "text", {"instruction": "anything"}) is True


def test_strict_needs_a_non_empty_answer():
    assert tasks.check_instruction("punctuation:no_comma", "   ", {}) is False
    assert tasks.if_reward(["punctuation:no_comma"], [{}], "") == 0.0


def test_loose_mode_drops_first_or_last_line_and_asterisks():
    ids, kwargs = ["punctuation:no_comma"], [{}]
    answer = "Sure, here it is:\nno commas in the body"
    assert tasks.if_reward(ids, kwargs, answer) == 0.0
    assert tasks.if_reward(ids, kwargs, answer, loose=True) == 1.0
    quoted = '*"all quoted"*'
    assert tasks.if_reward(["startend:quotation"], [{}], quoted) == 0.0
    assert tasks.if_reward(["startend:quotation"], [{}], quoted, loose=True) == 1.0
    assert tasks.if_reward(ids, kwargs, "a, b\nc, d\ne, f", loose=True) == 0.0


def test_binary_by_default_fraction_as_an_option():
    ids = ["punctuation:no_comma", "startend:quotation", "change_case:english_lowercase"]
    answer = "the cat sits on the warm mat, all day long in the sun."
    assert tasks.if_reward(ids, [{}, {}, {}], answer) == 0.0
    assert tasks.if_reward(ids, [{}, {}, {}], answer, fraction=True) == pytest.approx(1 / 3)
    example = {"domain": "if", "messages": [], "instruction_id_list": ids, "kwargs": [{}, {}, {}]}
    assert tasks.reward(example, answer, if_fraction=True) == pytest.approx(1 / 3)


def test_language_detection_is_thread_safe_from_a_cold_start(monkeypatch):
    """score_responses grades in a thread pool, so the first detections of a process can run at once. langdetect's
    own lazy set-up is not thread-safe (a thread could detect with half the language profiles loaded and call
    plain English "af" or "pl"): every thread must get the single-threaded answer."""
    texts = ["the dog runs in the park every morning with its owner.",
             "dogs feels calm and quiet, and it can teach us something new.",
             "A FULL MOON FEELS CALM AND QUIET. IT IS QUIET AND NICE."]
    monkeypatch.setattr(tasks.ifeval, "_langdetect_factory", None)  # as in a fresh process: profiles not loaded yet
    start, detected = threading.Barrier(8), []

    def detect():
        start.wait()
        detected.append([tasks.ifeval._detect_language(t) for t in texts])
    threads = [threading.Thread(target=detect) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert detected == [["en", "en", "en"]] * 8


def test_sentence_splitter_and_word_tokenizer():
    assert tasks.ifeval._split_sentences("Dr. Who is here. It is 3.5 m long! Is it?") == [
        "Dr. Who is here.", "It is 3.5 m long!", "Is it?"]
    assert tasks.ifeval._split_sentences("Wait... what? Yes.") == ["Wait...", "what?", "Yes."]
    assert tasks.ifeval._word_tokenize("Don't stop, OK? It's well-known.") == [
        "Do", "n't", "stop", ",", "OK", "?", "It", "'s", "well-known", "."]
    assert tasks.ifeval._count_words("well-known, isn't it") == 5  # \w+ tokens, as IFEval


def test_keywords_are_regexes_as_in_ifeval_but_bad_ones_match_literally():
    assert tasks.check_instruction("keywords:existence", "colour", {"keywords": ["colou?r"]}) is True
    assert tasks.check_instruction("keywords:existence", "a (b", {"keywords": ["(b"]}) is True
