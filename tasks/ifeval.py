"""
The if domain (instruction following): IFEval's 25 instructions and the 29 open-instruct (IFEvalG) ones that the
IF-RL data adds, every one of an example's instructions checked on the answer.

    {"domain": "if", "messages": [...], "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]}
"""

import json
import re
import threading

from .core import ExampleError

#
# Each checker is a function (answer, **kwargs) -> bool with IFEval's semantics, written from
# google-research/instruction_following_eval/instructions.py and allenai/open-instruct IFEvalG/instructions.py
# (their quirks kept: keywords are regular expressions, frequency counts substrings, ...). Relations are
# "less than" (strict) and "at least". Where the originals need NLTK data we approximate, deterministically:
#   - count_sentences: IFEval uses NLTK's Punkt model; we use IFEval's own rule-based splitter (_split_sentences),
#     which open-instruct's checkers use anyway. They agree on ordinary prose; they can differ on abbreviations.
#   - nltk.word_tokenize: a regex version of its Treebank rules (_word_tokenize): words, numbers, contractions
#     split off ("do", "n't"), every punctuation mark its own token.
#   - langdetect (language, english_capital / english_lowercase) is seeded, so a text always gets one answer.
# Kwargs are the dataset's, with nulls dropped; a missing required one raises (where IFEval would pick a random
# value), as does an unknown instruction id.

def _compare(count: int, relation: str, threshold: int) -> bool:
    if relation == "less than":
        return count < threshold
    if relation == "at least":
        return count >= threshold
    raise ValueError(f"relation must be 'less than' or 'at least', got {relation!r}")


def _regex(pattern: str) -> str:
    """IFEval uses keywords as regular expressions; one that does not compile is matched literally."""
    try:
        re.compile(pattern)
        return pattern
    except re.error:
        return re.escape(pattern)


def _split_sentences(text: str) -> list[str]:
    """IFEval's rule-based sentence splitter: protect the periods of abbreviations, decimals, acronyms and web
    addresses, then split after . ? ! (and after runs of dots)."""
    letter, digit = "([A-Za-z])", "([0-9])"
    starters = (r"(Mr|Mrs|Ms|Dr|Prof|Capt|Cpt|Lt|He\s|She\s|It\s|They\s|Their\s|Our\s|We\s|But\s|However\s|"
                r"That\s|This\s|Wherever)")
    text = (" " + text + "  ").replace("\n", " ")
    text = re.sub("(Mr|St|Mrs|Ms|Dr)[.]", r"\1<prd>", text)
    text = re.sub("[.](com|net|org|io|gov|edu|me)", r"<prd>\1", text)
    text = re.sub(digit + "[.]" + digit, r"\1<prd>\2", text)
    text = re.sub(r"\.{2,}", lambda m: "<prd>" * len(m.group(0)) + "<stop>", text)
    text = text.replace("Ph.D.", "Ph<prd>D<prd>")
    text = re.sub(r"\s" + letter + "[.] ", r" \1<prd> ", text)
    text = re.sub("([A-Z][.][A-Z][.](?:[A-Z][.])?) " + starters, r"\1<stop> \2", text)
    text = re.sub(letter + "[.]" + letter + "[.]" + letter + "[.]", r"\1<prd>\2<prd>\3<prd>", text)
    text = re.sub(letter + "[.]" + letter + "[.]", r"\1<prd>\2<prd>", text)
    text = re.sub(" (Inc|Ltd|Jr|Sr|Co)[.] " + starters, r" \1<stop> \2", text)
    text = re.sub(" (Inc|Ltd|Jr|Sr|Co)[.]", r" \1<prd>", text)
    text = re.sub(" " + letter + "[.]", r" \1<prd>", text)
    text = text.replace(".”", "”.").replace('."', '".').replace('!"', '"!').replace('?"', '"?')
    text = text.replace(".", ".<stop>").replace("?", "?<stop>").replace("!", "!<stop>").replace("<prd>", ".")
    sentences = [s.strip() for s in text.split("<stop>")]
    return sentences[:-1] if sentences and not sentences[-1] else sentences


def _count_sentences(text: str) -> int:
    return len(_split_sentences(text))


_CONTRACTIONS = re.compile(r"(?i)(\w)(n't|'s|'re|'ve|'ll|'d|'m)\b")
_WORD_TOKEN = re.compile(r"n't|N'T|'\w+|\w+(?:[-.']\w+)*|\.\.\.|--|[^\w\s]")


def _word_tokenize(text: str) -> list[str]:
    """Approximately nltk.word_tokenize: "Don't stop, OK?" -> Do n't stop , OK ?"""
    return _WORD_TOKEN.findall(_CONTRACTIONS.sub(r"\1 \2", text))


def _count_words(text: str) -> int:
    return len(re.findall(r"\w+", text))  # nltk's RegexpTokenizer(r"\w+"), as IFEval


_langdetect_lock = threading.Lock()
_langdetect_factory = None  # ours, seeded; set only once every language profile is loaded


def _detect_language(text: str):
    """ISO 639-1 code by langdetect (seeded), or None when it cannot tell (IFEval then counts the check as passed).

    Not langdetect.detect(): its lazy global set-up (init_factory) is not thread-safe. It publishes the factory
    before loading the profiles, so a second thread (score_responses grades in a pool) can detect with some of the
    55 languages loaded ('en' missing: "af", "pl"), or two threads load into one factory and corrupt it for the
    rest of the process. Here the profiles load once, under a lock, into a factory of our own that is published
    only when complete; after that detection only reads it (each Detector has its own seeded Random)."""
    global _langdetect_factory
    from langdetect import PROFILES_DIRECTORY, DetectorFactory, LangDetectException
    if _langdetect_factory is None:
        with _langdetect_lock:
            if _langdetect_factory is None:
                factory = DetectorFactory()
                factory.load_profile(PROFILES_DIRECTORY)
                factory.set_seed(0)
                _langdetect_factory = factory
    try:
        detector = _langdetect_factory.create()
        detector.append(text)
        return detector.detect()
    except LangDetectException:
        return None


def _paragraphs_ok(parts: list[str]):
    """IFEval's paragraph count: empty parts are allowed only at the very start or end. None if one is inside."""
    count = len(parts)
    for i, part in enumerate(parts):
        if not part.strip():
            if i in (0, len(parts) - 1):
                count -= 1
            else:
                return None
    return count


# --- IFEval's 25 ---

def keywords_existence(answer, keywords):
    return all(re.search(_regex(k), answer, flags=re.IGNORECASE) for k in keywords)


def keywords_frequency(answer, keyword, frequency, relation):
    return _compare(len(re.findall(_regex(keyword.strip()), answer, flags=re.IGNORECASE)), relation, frequency)


def keywords_forbidden_words(answer, forbidden_words):
    return not any(re.search(r"\b" + _regex(w) + r"\b", answer, flags=re.IGNORECASE) for w in forbidden_words)


def keywords_letter_frequency(answer, letter, let_frequency, let_relation):
    if not isinstance(letter, str) or len(letter.strip()) != 1:
        raise ValueError(f"letter must be one character, got {letter!r}")
    return _compare(answer.lower().count(letter.strip().lower()), let_relation, let_frequency)


def language_response_language(answer, language):
    detected = _detect_language(answer)
    return detected is None or detected == language


def length_number_sentences(answer, num_sentences, relation):
    return _compare(_count_sentences(answer), relation, num_sentences)


def length_number_paragraphs(answer, num_paragraphs):
    count = _paragraphs_ok(re.split(r"\s?\*\*\*\s?", answer))
    return count is not None and count == num_paragraphs


def length_number_words(answer, num_words, relation):
    return _compare(_count_words(answer), relation, num_words)


def length_nth_paragraph_first_word(answer, num_paragraphs, nth_paragraph, first_word):
    paragraphs = re.split(r"\n\n", answer)
    count = sum(1 for p in paragraphs if p.strip())
    if nth_paragraph > count or not paragraphs[nth_paragraph - 1].strip():
        return False
    word = paragraphs[nth_paragraph - 1].strip().split()[0].strip().lstrip("'").lstrip('"')
    first = ""
    for ch in word:
        if ch in ".,?!'\"":
            break
        first += ch.lower()
    return count == num_paragraphs and first == first_word.lower()


def content_number_placeholders(answer, num_placeholders):
    return len(re.findall(r"\[.*?\]", answer)) >= num_placeholders


def content_postscript(answer, postscript_marker):
    marker = postscript_marker.strip()
    if marker == "P.P.S":
        pattern = r"\s*p\.\s?p\.\s?s.*$"
    elif marker == "P.S.":
        pattern = r"\s*p\.\s?s\..*$"
    else:
        pattern = r"\s*" + _regex(marker.lower()) + r".*$"
    return bool(re.findall(pattern, answer.lower(), flags=re.MULTILINE))


def format_number_bullet_lists(answer, num_bullets):
    stars = re.findall(r"^\s*\*[^\*].*$", answer, flags=re.MULTILINE)
    dashes = re.findall(r"^\s*-.*$", answer, flags=re.MULTILINE)
    return len(stars) + len(dashes) == num_bullets


def format_constrained_response(answer):
    return any(option in answer.strip() for option in ("My answer is yes.", "My answer is no.", "My answer is maybe."))


def format_number_highlighted_sections(answer, num_highlights):
    single = [h for h in re.findall(r"\*[^\n\*]*\*", answer) if h.strip("*").strip()]
    double = [h for h in re.findall(r"\*\*[^\n\*]*\*\*", answer) if h[2:-2].strip()]
    return len(single) + len(double) >= num_highlights


def format_multiple_sections(answer, section_spliter, num_sections):
    sections = re.split(r"\s?" + _regex(section_spliter.strip()) + r"\s?\d+\s?", answer)
    return len(sections) - 1 >= num_sections


def format_json_format(answer):
    value = answer.strip()
    for prefix in ("```json", "```Json", "```JSON", "```"):
        value = value.removeprefix(prefix)
    value = value.removesuffix("```").strip()
    try:
        json.loads(value)
    except ValueError:
        return False
    return True


def format_title(answer):
    return any(t.lstrip("<").rstrip(">").strip() for t in re.findall(r"<<[^\n]+>>", answer))


def combination_two_responses(answer):
    responses = answer.split("******")
    valid = []
    for i, r in enumerate(responses):
        if not r.strip():
            if i not in (0, len(responses) - 1):
                return False
        else:
            valid.append(r)
    return len(valid) == 2 and valid[0].strip() != valid[1].strip()


def combination_repeat_prompt(answer, prompt_to_repeat):
    return answer.strip().lower().startswith(prompt_to_repeat.strip().lower())


def startend_end_checker(answer, end_phrase):
    return answer.strip().strip('"').lower().endswith(end_phrase.strip().lower())


def change_case_capital_word_frequency(answer, capital_frequency, capital_relation):
    return _compare(sum(1 for w in _word_tokenize(answer) if w.isupper()), capital_relation, capital_frequency)


def change_case_english_capital(answer):
    return answer.isupper() and _detect_language(answer) in ("en", None)


def change_case_english_lowercase(answer):
    return answer.islower() and _detect_language(answer) in ("en", None)


def punctuation_no_comma(answer):
    return "," not in answer


def startend_quotation(answer):
    value = answer.strip()
    return len(value) > 1 and value[0] == '"' and value[-1] == '"'


# --- open-instruct's IFEvalG additions (the ids the IF-RL data adds) ---

def copy_repeat_phrase(answer, phrase, small_n):
    reference = phrase.strip().split()
    found = re.findall(rf"{_regex(reference[0])} .*? {_regex(reference[-1])}", answer)
    if len(found) != small_n or not found:
        return False
    differences = 0
    for candidate in found:  # as in open-instruct, only the last phrase's count of changed words decides
        words = candidate.split()
        if len(words) != len(reference):
            return False
        differences = sum(a != b for a, b in zip(words, reference))
        if differences > 1:
            return False
    return differences == 1


def copy_copy(answer, prompt_to_repeat):
    return answer.strip().lower() == prompt_to_repeat.strip().lower()


def new_copy_span_idx(answer, prompt_to_repeat, n_start, n_end):
    return answer.strip().lower() == prompt_to_repeat[n_start:n_end].strip().lower()


def format_sentence_hyphens(answer):
    gold = _split_sentences(answer.replace("-", " "))
    return all(part.strip() == part and part == g for part, g in zip(answer.split("-"), gold))


def keywords_no_adjacent_consecutive(answer):
    words = answer.split()
    return not any(ord(b[0].lower()[0]) - ord(a[0].lower()[0]) == 1 for a, b in zip(words, words[1:]))


def format_square_brackets(answer):
    return all(w.startswith("[") and w.endswith("]") for w in answer.split())


def keywords_word_once(answer, keyword):
    return len(re.findall(_regex(keyword.strip()), answer, flags=re.IGNORECASE)) == 1


def keywords_exclude_word_harder(answer, keyword):
    return " " + keyword.strip() + " " not in answer


def paragraphs_paragraphs(answer):
    return _paragraphs_ok(re.split(r"\s?\*\*\*\s?", answer)) == 2


def paragraphs_paragraphs2(answer):
    return _paragraphs_ok(re.split(r"\n\n", answer)) == 2


def _one_word(word):
    return (word[0] if isinstance(word, list) else word).strip()


def first_word_first_word_sent(answer, first_word):
    target = _one_word(first_word).lower()
    return all(s.strip() and s.split()[0].lower() == target for s in _split_sentences(answer))


def first_word_first_word_answer(answer, first_word):
    return bool(answer.split()) and answer.split()[0].lower() == _one_word(first_word).lower()


def last_word_last_word_sent(answer, last_word):
    target = _one_word(last_word).lower()
    return all(s.strip() and re.sub(r"[^\w\s]", "", s.split()[-1]).lower() == target for s in _split_sentences(answer))


def last_word_last_word_answer(answer, last_word):
    words = answer.split()
    return bool(words) and re.sub(r"[^\w\s]", "", words[-1]).lower() == _one_word(last_word).lower()


def format_bigram_wrapping(answer):
    words = answer.split()
    return all(words[i].startswith("<<") and words[i + 1].endswith(">>") for i in range(0, len(words) - 1, 2))


def copy_copying_simple(answer, prompt_to_repeat):
    return answer.strip().lower() == prompt_to_repeat.strip().lower()


def copy_copying_multiple(answer, prompt_to_repeat, N):
    copies = answer.split("******")
    return len(copies) == N and all(c.strip().lower() == prompt_to_repeat.strip().lower() for c in copies)


def punctuation_punctuation_dot(answer):
    return "." not in answer


def punctuation_punctuation_exclamation(answer):
    return "!" not in answer


def count_lowercase_counting(answer, N):
    return len(re.findall(r"\b[a-z]+\b", answer)) <= N


def letters_letter_counting(answer, N, relation):
    return _compare(len(re.findall(r"[a-zA-Z]", answer)), relation, N)


def count_counting_composition(answer, n_sent, n_words):
    parts = re.split(r"\s?\*\*\*\s?", answer)
    count = len(parts)
    for i, part in enumerate(parts):
        if not part.strip():
            if i not in (0, len(parts) - 1):
                return False
            count -= 1
        sentences = _split_sentences(part)  # as in open-instruct, even an empty edge part must have n_sent
        if len(sentences) != n_sent or any(len(_word_tokenize(s)) != n_words for s in sentences):
            return False
    return count == 3


def count_count_unique(answer):
    words = _word_tokenize(answer)
    return len(words) == len(set(words))


def count_count_increment_word(answer, keyword1, keyword2):
    once = len(re.findall(_regex(keyword1.strip()), answer, flags=re.IGNORECASE))
    twice = len(re.findall(_regex(keyword2.strip()), answer, flags=re.IGNORECASE))
    return once == 1 and twice == 2


def keywords_palindrome(answer):
    return any(w == w[::-1] for w in answer.split())


def keywords_keyword_specific_position(answer, keyword, n, m):
    sentences = _split_sentences(answer)
    if len(sentences) < n:
        return False
    words = _word_tokenize(sentences[n - 1])
    return len(words) >= m and words[m - 1] == _one_word(keyword)


def keywords_start_end(answer):
    words = _word_tokenize(answer)
    return len(words) >= 2 and words[0].lower() == words[-1].lower()


INSTRUCTIONS = {
    # IFEval
    "keywords:existence": keywords_existence,
    "keywords:frequency": keywords_frequency,
    "keywords:forbidden_words": keywords_forbidden_words,
    "keywords:letter_frequency": keywords_letter_frequency,
    "language:response_language": language_response_language,
    "length_constraints:number_sentences": length_number_sentences,
    "length_constraints:number_paragraphs": length_number_paragraphs,
    "length_constraints:number_words": length_number_words,
    "length_constraints:nth_paragraph_first_word": length_nth_paragraph_first_word,
    "detectable_content:number_placeholders": content_number_placeholders,
    "detectable_content:postscript": content_postscript,
    "detectable_format:number_bullet_lists": format_number_bullet_lists,
    "detectable_format:constrained_response": format_constrained_response,
    "detectable_format:number_highlighted_sections": format_number_highlighted_sections,
    "detectable_format:multiple_sections": format_multiple_sections,
    "detectable_format:json_format": format_json_format,
    "detectable_format:title": format_title,
    "combination:two_responses": combination_two_responses,
    "combination:repeat_prompt": combination_repeat_prompt,
    "startend:end_checker": startend_end_checker,
    "change_case:capital_word_frequency": change_case_capital_word_frequency,
    "change_case:english_capital": change_case_english_capital,
    "change_case:english_lowercase": change_case_english_lowercase,
    "punctuation:no_comma": punctuation_no_comma,
    "startend:quotation": startend_quotation,
    # open-instruct IFEvalG
    "copy:repeat_phrase": copy_repeat_phrase,
    "copy:copy": copy_copy,
    "new:copy_span_idx": new_copy_span_idx,
    "detectable_format:sentence_hyphens": format_sentence_hyphens,
    "keywords:no_adjacent_consecutive": keywords_no_adjacent_consecutive,
    "detectable_format:square_brackets": format_square_brackets,
    "keywords:word_once": keywords_word_once,
    "keywords:word_count_different_numbers": keywords_frequency,  # the same check under another id
    "keywords:exclude_word_harder": keywords_exclude_word_harder,
    "paragraphs:paragraphs": paragraphs_paragraphs,
    "paragraphs:paragraphs2": paragraphs_paragraphs2,
    "first_word:first_word_sent": first_word_first_word_sent,
    "first_word:first_word_answer": first_word_first_word_answer,
    "last_word:last_word_sent": last_word_last_word_sent,
    "last_word:last_word_answer": last_word_last_word_answer,
    "detectable_format:bigram_wrapping": format_bigram_wrapping,
    "copy:copying_simple": copy_copying_simple,
    "copy:copying_multiple": copy_copying_multiple,
    "punctuation:punctuation_dot": punctuation_punctuation_dot,
    "punctuation:punctuation_exclamation": punctuation_punctuation_exclamation,
    "count:lowercase_counting": count_lowercase_counting,
    "letters:letter_counting": letters_letter_counting,
    "letters:letter_counting2": keywords_letter_frequency,  # the same check under another id
    "count:counting_composition": count_counting_composition,
    "count:count_unique": count_count_unique,
    "count:count_increment_word": count_count_increment_word,
    "keywords:palindrome": keywords_palindrome,
    "keywords:keyword_specific_position": keywords_keyword_specific_position,
    "keywords:start_end": keywords_start_end,
}


# The count and position arguments: no instruction can use a negative one (IFEval would never build it).
COUNT_KWARGS = {"N", "capital_frequency", "frequency", "let_frequency", "m", "n", "n_end", "n_sent", "n_start",
                "n_words", "nth_paragraph", "num_bullets", "num_highlights", "num_paragraphs", "num_placeholders",
                "num_sections", "num_sentences", "num_words", "small_n"}


def _bad_count(instruction_id: str, kwargs: dict):
    """Why a count argument of this instruction is unusable (negative, or not a number), or None."""
    for k in sorted(COUNT_KWARGS & set(kwargs)):
        v = kwargs[k]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
            return f"instruction '{instruction_id}': {k}={v!r} must be a number >= 0"
    return None


def check_instruction(instruction_id: str, answer: str, kwargs: dict) -> bool:
    """One instruction on one answer (strict: an empty answer follows nothing). Raises on an unknown id, or on
    kwargs the instruction cannot use (missing required ones; unknown ones are ignored, as NeMo-Gym's data
    carries some builder-only keys)."""
    check = INSTRUCTIONS.get(instruction_id)
    if check is None:
        raise ValueError(f"unknown instruction id '{instruction_id}'")
    params = check.__code__.co_varnames[1:check.__code__.co_argcount]
    missing = [p for p in params if p not in kwargs]
    if missing:
        raise ValueError(f"instruction '{instruction_id}' needs kwargs {missing}, got {sorted(kwargs)}")
    if why := _bad_count(instruction_id, kwargs):
        raise ValueError(why)
    return bool(answer.strip()) and bool(check(answer, **{p: kwargs[p] for p in params}))


def _loose_variants(answer: str) -> list[str]:
    """IFEval's loose mode: the answer with and without '*', and without its first and/or last line."""
    lines = answer.split("\n")
    cut = ["\n".join(lines[1:]).strip(), "\n".join(lines[:-1]).strip(), "\n".join(lines[1:-1]).strip()]
    return [answer, answer.replace("*", "")] + cut + [c.replace("*", "") for c in cut]


def if_reward(instruction_ids, kwargs_list, answer: str, loose=False, fraction=False) -> float:
    """1.0 if every instruction holds (or, with fraction=True, the fraction that do)."""
    variants = _loose_variants(answer) if loose else [answer]
    held = [any(check_instruction(iid, v, kwargs or {}) for v in variants)
            for iid, kwargs in zip(instruction_ids, kwargs_list)]
    if fraction:
        return sum(held) / len(held) if held else 0.0
    return float(bool(held) and all(held))


def check(example: dict, where: str):
    ids, kwargs = example.get("instruction_id_list"), example.get("kwargs")
    if not isinstance(ids, list) or not ids or not all(isinstance(i, str) for i in ids):
        raise ExampleError(where, "instruction_id_list", f"expected a non-empty list of ids, got {ids!r:.80}")
    if not isinstance(kwargs, list) or len(kwargs) != len(ids):
        raise ExampleError(where, "kwargs", f"expected {len(ids)} dicts, one per instruction, got {kwargs!r:.80}")
    cleaned = []
    for i, (iid, kw) in enumerate(zip(ids, kwargs)):
        if iid not in INSTRUCTIONS:
            raise ExampleError(where, f"instruction_id_list[{i}]", f"unknown instruction id '{iid}'")
        if kw is not None and not isinstance(kw, dict):
            raise ExampleError(where, f"kwargs[{i}]", f"expected a dict or null, got {kw!r:.80}")
        cleaned.append({k: v for k, v in (kw or {}).items() if v is not None})  # null kwargs mean "not set"
        if why := _bad_count(iid, cleaned[-1]):
            raise ExampleError(where, f"kwargs[{i}]", why)
    example["kwargs"] = cleaned


def reward(example: dict, answer: str, *, if_loose=False, if_fraction=False, **_) -> float:
    return if_reward(example["instruction_id_list"], example["kwargs"], answer, loose=if_loose, fraction=if_fraction)
