"""Tokenizer and chat template: special tokens, BPE training, exact renderings, the assistant mask, parsing."""

import json
from pathlib import Path

import pytest

from tokenizer import (
    SPECIAL_TOKENS, Tokenizer, encode_chat, encode_prompt, load_tokenizer, parse_response, render_chat, train_bpe,
)

REPO = Path(__file__).resolve().parent.parent


def synthetic_texts():
    """A few hundred varied lines: chat markup, numbers, punctuation, a little non-ASCII."""
    words = "the answer is a number we think about it carefully and then check every step twice".split()
    texts = []
    for i in range(300):
        sentence = " ".join(words[(i * 7 + k) % len(words)] for k in range(6 + i % 5))
        texts.append(f"<|im_start|>user\nWhat is {i} + {i * 3}?<|im_end|>\n<|im_start|>assistant\n<think>\n"
                     f"{sentence.capitalize()}: {i} + {i * 3} = {i * 4}.\n</think>\nThe answer is {i * 4}.<|im_end|>")
        texts.append(f"Café #{i}: {sentence}, naïve résumé; 東京 {i % 10}! (x_{i} = {i / 7:.3f})")
    return texts


@pytest.fixture(scope="module")
def tok():
    return train_bpe(synthetic_texts(), vocab_size=360)


# -----------------------------------------------------------------------------
# The tokenizer


def test_special_tokens_at_fixed_ids(tok):
    for i, token in enumerate(SPECIAL_TOKENS):
        assert tok.token_id(token) == i
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    assert tok.stop_token_ids == [tok.eos_id, tok.token_id("<|im_end|>")]
    with pytest.raises(KeyError):
        tok.token_id("<not a token>")


def test_round_trip_with_special_tokens(tok):
    text = ("<|im_start|>user\nCafé 東京 🚀 x=12345, tabs\tand  spaces<|im_end|>\n<|im_start|>assistant\n<think>\n"
            "hmm\n</think>\n<tool_call>\n<function=f>\n<parameter=a>\n1\n</parameter>\n</function>\n</tool_call>\n"
            "<|im_end|><tools></tools><tool_response></tool_response><s></s><unk>")
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    for token in SPECIAL_TOKENS:  # each special token in the text is one id
        assert ids.count(tok.token_id(token)) == text.count(token)
    assert tok.decode(tok.encode("a<think>b")) == "a<think>b"
    assert tok.decode(ids, skip_special_tokens=True) == (
        "user\nCafé 東京 🚀 x=12345, tabs\tand  spaces\nassistant\n\nhmm\n\n\n<function=f>\n<parameter=a>\n1\n"
        "</parameter>\n</function>\n\n")
    assert tok.encode("7 + 35") == [tok.token_id("7"), tok.token_id("Ġ+"), tok.token_id("Ġ"), tok.token_id("3"),
                                    tok.token_id("5")]  # one token per digit


def test_train_bpe_is_deterministic_and_sized(tok, tmp_path):
    again = train_bpe(synthetic_texts(), vocab_size=360)
    tok.save(tmp_path / "a.json")
    again.save(tmp_path / "b.json")
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()
    assert tok.vocab_size == 360
    # too little text: it runs out of pairs after 2 merges (a b -> ab, then Ġ ab -> Ġab)
    tiny = train_bpe(["ab ab ab"], vocab_size=600)
    assert tiny.vocab_size == len(SPECIAL_TOKENS) + 256 + 2


def test_save_and_load(tok, tmp_path):
    text = "<|im_start|>user\nWhat is 12 + 30?<|im_end|>"
    tok.save(tmp_path / "tokenizer.json")
    loaded = load_tokenizer(tmp_path / "tokenizer.json")
    assert loaded.encode(text) == tok.encode(text) and loaded.vocab_size == tok.vocab_size

    tok.save_pretrained(tmp_path / "hf")
    loaded = load_tokenizer(tmp_path / "hf")
    assert loaded.encode(text) == tok.encode(text)
    assert (loaded.pad_id, loaded.bos_id, loaded.eos_id) == (0, 1, 2)

    # a release whose config names <|im_end|> as eos (as Nemotron 3 Nano's does): both ends still stop
    config_path = tmp_path / "hf" / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["eos_token"] = {"content": "<|im_end|>", "lstrip": False}
    config_path.write_text(json.dumps(config))
    loaded = Tokenizer.from_pretrained(tmp_path / "hf")
    assert loaded.eos_id == 4 and loaded.stop_token_ids == [2, 4]


def test_transformers_can_load_saved_tokenizer(tok, tmp_path):
    transformers = pytest.importorskip("transformers")
    tok.save_pretrained(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    text = "<|im_start|>user\nCafé: 12 + 30?<|im_end|>\n<think>\nok\n</think>"
    assert hf(text, add_special_tokens=False)["input_ids"] == tok.encode(text)
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (1, 2, 0)


@pytest.mark.skipif(not (REPO / "data" / "tokenizer.json").exists(), reason="data/tokenizer.json not generated yet")
def test_shipped_tokenizer():
    tok = load_tokenizer()  # data/tokenizer.json
    for i, token in enumerate(SPECIAL_TOKENS):
        assert tok.token_id(token) == i
    assert tok.vocab_size <= 2048
    text = ("<|im_start|>user\nWhat is 17 * 3?<|im_end|>\n<|im_start|>assistant\n<think>\n17*3 = 51\n</think>\n"
            "51<|im_end|>")
    assert tok.decode(tok.encode(text)) == text


# -----------------------------------------------------------------------------
# The chat template: byte for byte the official one
#
# OFFICIAL_RENDERINGS holds the official Nemotron 3 Nano chat template's renderings of OFFICIAL_CASES, made once
# (the template is not read at test time) with jinja2 as transformers' apply_chat_template renders it:
# ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols]), tojson =
# json.dumps(x, ensure_ascii=False), enable_thinking = our thinking. The template's text: the chat_template of
# nvidia/NVIDIA-Nemotron-3-Nano-30B-A3B-BF16 (llama.cpp models/templates/, sha256 of the CRLF file
# 650b9d301337fd103f9014f6f6ae89b46660ae92e4421d95bd3157115e5b02ce).

QUESTION = {"role": "user", "content": "What is 2+2?"}
THOUGHT_ANSWER = {"role": "assistant", "content": "<think>\n2+2 is 4.\n</think>\nThe answer is 4."}
REASONING_CONTENT = {"role": "assistant", "reasoning_content": "3+3 is 6.", "content": "6."}
PLAIN_ANSWER = {"role": "assistant", "content": "The answer is 4."}
WEATHER_SYSTEM = {"role": "system", "content": "You are a weather bot."}
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather for a city. ",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "description": "City name"},
        "days": {"type": "integer", "enum": [1, 2], "minimum": 1},
        "units": {"type": ["string", "null"], "items": {"type": "string"}}},
        "required": ["city"], "additionalProperties": False}, "strict": True}},
    {"name": "get_time", "parameters": {"type": "object", "properties": {"zone": {"type": "string"}}}}]
CALL_PARIS = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}}
CALL_TIME = {"name": "get_time",
             "arguments": {"zone": "CET", "flags": [1, "a"], "opts": {"x": True}, "ok": True, "f": 1.5}}


def user(text):
    return {"role": "user", "content": text}


def assistant(content, *calls, **fields):
    return dict({"role": "assistant", "content": content}, **({"tool_calls": list(calls)} if calls else {}), **fields)


def tool(text):
    return {"role": "tool", "content": text}


OFFICIAL_CASES = {  # name -> render_chat's arguments
    "single_thinking": dict(messages=[QUESTION, THOUGHT_ANSWER]),
    "reasoning_content": dict(messages=[QUESTION, assistant("The answer is 4.", reasoning_content="2+2 is 4.")]),
    "non_thinking_flag": dict(messages=[{"role": "system", "content": "Be brief."}, QUESTION, THOUGHT_ANSWER],
                              thinking=False),
    "plain_answer": dict(messages=[{"role": "system", "content": "Be brief."}, QUESTION, PLAIN_ANSWER]),
    "gen_thinking": dict(messages=[QUESTION], add_generation_prompt=True),
    "gen_non_thinking": dict(messages=[QUESTION], add_generation_prompt=True, thinking=False),
    "multi_turn": dict(messages=[QUESTION, THOUGHT_ANSWER, user("And 3+3?"), REASONING_CONTENT]),
    "multi_turn_history_without_thinking": dict(messages=[QUESTION, PLAIN_ANSWER, user("And 3+3?"), REASONING_CONTENT]),
    "multi_turn_gen_non_thinking": dict(messages=[QUESTION, THOUGHT_ANSWER, user("And 3+3?")],
                                        add_generation_prompt=True, thinking=False),
    "whitespace_as_written": dict(messages=[user(" 12 "), assistant("\n<think>\n\n...12!\n</think>\n\n12 é \n")]),
    "tools_and_results": dict(messages=[
        WEATHER_SYSTEM, user("Weather in Paris?"),
        assistant("<think>\nI should call the tool.\n</think>\n", CALL_PARIS),
        tool('{"temp_c": 21}'), tool('{"sky": "clear"}'), assistant("<think>\n21 and clear.\n</think>\nSunny, 21°C.")],
        tools=TOOLS),
    "tools_no_system": dict(messages=[QUESTION], tools=TOOLS, add_generation_prompt=True),
    "parallel_typed_calls": dict(messages=[QUESTION, assistant("<think>\nTwo calls.\n</think>\nChecking.", CALL_PARIS,
                                                               CALL_TIME)], tools=TOOLS),
    "call_without_content": dict(messages=[QUESTION, assistant("", CALL_TIME)]),
    "call_none_content": dict(messages=[QUESTION, assistant(None, CALL_TIME)]),
    "earlier_call_turn": dict(messages=[
        QUESTION, assistant("<think>\nCall.\n</think>\nOne moment.", CALL_PARIS), tool("21"),
        assistant("<think>\nok\n</think>\n21."), user("Thanks")], tools=TOOLS, add_generation_prompt=True),
    "earlier_call_turn_thought_only": dict(messages=[
        QUESTION, assistant("<think>\nCall.\n</think>\n", CALL_PARIS), tool("21"), user("Thanks")]),
    "later_system_turn": dict(messages=[WEATHER_SYSTEM, QUESTION, {"role": "system", "content": "Answer in French."},
                                        PLAIN_ANSWER]),
    "tool_after_user_then_user": dict(messages=[QUESTION, tool("x"), user("y")]),
    "unclosed_thought": dict(messages=[QUESTION, assistant("<think>\nno end")]),
    "empty_earlier_answer": dict(messages=[QUESTION, assistant("<think>\nonly thought\n</think>"), user("?")]),
    "other_role": dict(messages=[QUESTION, {"role": "ipython", "content": "out"}]),
}


# The official rendering of TOOLS in the system turn: the tool list, then the template's tool-use reminder.
TOOLS_TEXT = (
    '# Tools\n\nYou have access to the following functions:\n\n<tools>\n<function>\n'
    '<name>get_weather</name>\n<description>Current weather for a city.</description>\n<parameters>\n'
    '<parameter>\n<name>city</name>\n<type>string</type>\n<description>City name</description>\n'
    '</parameter>\n<parameter>\n<name>days</name>\n<type>integer</type>\n<enum>[1, 2]</enum>\n'
    '<minimum>1</minimum>\n</parameter>\n<parameter>\n<name>units</name>\n'
    '<type>[\'string\', \'null\']</type>\n<items>{"type": "string"}</items>\n</parameter>\n'
    '<additionalProperties>False</additionalProperties>\n<required>["city"]</required>\n</parameters>\n'
    '<strict>True</strict>\n</function>\n<function>\n<name>get_time</name>\n<parameters>\n<parameter>\n'
    '<name>zone</name>\n<type>string</type>\n</parameter>\n</parameters>\n</function>\n</tools>\n\n'
    'If you choose to call a function ONLY reply in the following format with NO suffix:\n\n'
    '<tool_call>\n<function=example_function_name>\n<parameter=example_parameter_1>\nvalue_1\n'
    '</parameter>\n<parameter=example_parameter_2>\nThis is the value for the second parameter\n'
    'that can span\nmultiple lines\n</parameter>\n</function>\n</tool_call>\n\n<IMPORTANT>\nReminder:\n'
    '- Function calls MUST follow the specified format: an inner <function=...></function> '
    'block must be nested within <tool_call></tool_call> XML tags\n'
    '- Required parameters MUST be specified\n'
    '- You may provide optional reasoning for your function call in natural language BEFORE '
    'the function call, but NOT after\n'
    '- If there is no function call available, answer the question like normal with your '
    'current knowledge and do not tell the user about function calls\n</IMPORTANT>')

OFFICIAL_RENDERINGS = {  # name -> the official template's text, rendered with jinja2 (see the comment above)
    "single_thinking": (
        '<|im_start|>system\n<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n'
        '<think>\n2+2 is 4.\n</think>\nThe answer is 4.<|im_end|>\n'),
    "reasoning_content": (
        '<|im_start|>system\n<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n'
        '<think>\n2+2 is 4.\n</think>\nThe answer is 4.<|im_end|>\n'),
    "non_thinking_flag": (
        '<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n'
        '<|im_start|>assistant\n<think>\n2+2 is 4.\n</think>\nThe answer is 4.<|im_end|>\n'),
    "plain_answer": (
        '<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n'
        '<|im_start|>assistant\n<think></think>The answer is 4.<|im_end|>\n'),
    "gen_thinking": (
        '<|im_start|>system\n<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n'
        '<think>\n'),
    "gen_non_thinking": (
        '<|im_start|>system\n<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n'
        '<think></think>'),
    "multi_turn": (
        '<|im_start|>system\n<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n'
        '<think></think>\nThe answer is 4.<|im_end|>\n<|im_start|>user\nAnd 3+3?<|im_end|>\n'
        '<|im_start|>assistant\n<think>\n3+3 is 6.\n</think>\n6.<|im_end|>\n'),
    "multi_turn_history_without_thinking": (
        '<|im_start|>system\n<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n'
        '<think></think>The answer is 4.<|im_end|>\n<|im_start|>user\nAnd 3+3?<|im_end|>\n'
        '<|im_start|>assistant\n<think>\n3+3 is 6.\n</think>\n6.<|im_end|>\n'),
    "multi_turn_gen_non_thinking": (
        '<|im_start|>system\n<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n'
        '<think></think>\nThe answer is 4.<|im_end|>\n<|im_start|>user\nAnd 3+3?<|im_end|>\n'
        '<|im_start|>assistant\n<think></think>'),
    "whitespace_as_written": (
        '<|im_start|>system\n<|im_end|>\n<|im_start|>user\n 12 <|im_end|>\n<|im_start|>assistant\n<think>\n'
        '\n...12!\n</think>\n\n12 é<|im_end|>\n'),
    "tools_and_results": (
        '<|im_start|>system\nYou are a weather bot.\n\n'
        + TOOLS_TEXT
        + '<|im_end|>\n<|im_start|>user\nWeather in Paris?<|im_end|>\n<|im_start|>assistant\n<think>\n'
        'I should call the tool.\n</think>\n<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n'
        '</parameter>\n<parameter=days>\n2\n</parameter>\n</function>\n</tool_call>\n<|im_end|>\n'
        '<|im_start|>user\n<tool_response>\n{"temp_c": 21}\n</tool_response>\n<tool_response>\n'
        '{"sky": "clear"}\n</tool_response>\n<|im_end|>\n<|im_start|>assistant\n<think>\n21 and clear.\n'
        '</think>\nSunny, 21°C.<|im_end|>\n'),
    "tools_no_system": (
        '<|im_start|>system\n'
        + TOOLS_TEXT
        + '<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n<think>\n'),
    "parallel_typed_calls": (
        '<|im_start|>system\n'
        + TOOLS_TEXT
        + '<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n<think>\nTwo calls.\n'
        '</think>\nChecking.\n<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n'
        '<parameter=days>\n2\n</parameter>\n</function>\n</tool_call>\n<tool_call>\n<function=get_time>\n'
        '<parameter=zone>\nCET\n</parameter>\n<parameter=flags>\n[1, "a"]\n</parameter>\n<parameter=opts>\n'
        '{"x": true}\n</parameter>\n<parameter=ok>\nTrue\n</parameter>\n<parameter=f>\n1.5\n</parameter>\n'
        '</function>\n</tool_call>\n<|im_end|>\n'),
    "call_without_content": (
        '<|im_start|>system\n<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n'
        '<think></think>\n<tool_call>\n<function=get_time>\n<parameter=zone>\nCET\n</parameter>\n'
        '<parameter=flags>\n[1, "a"]\n</parameter>\n<parameter=opts>\n{"x": true}\n</parameter>\n'
        '<parameter=ok>\nTrue\n</parameter>\n<parameter=f>\n1.5\n</parameter>\n</function>\n</tool_call>\n'
        '<|im_end|>\n'),
    "call_none_content": (
        '<|im_start|>system\n<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n'
        '<think></think>\n<tool_call>\n<function=get_time>\n<parameter=zone>\nCET\n</parameter>\n'
        '<parameter=flags>\n[1, "a"]\n</parameter>\n<parameter=opts>\n{"x": true}\n</parameter>\n'
        '<parameter=ok>\nTrue\n</parameter>\n<parameter=f>\n1.5\n</parameter>\n</function>\n</tool_call>\n'
        '<|im_end|>\n'),
    "earlier_call_turn": (
        '<|im_start|>system\n'
        + TOOLS_TEXT
        + '<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n'
        '<think></think>One moment.\n<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n'
        '</parameter>\n<parameter=days>\n2\n</parameter>\n</function>\n</tool_call>\n<|im_end|>\n'
        '<|im_start|>user\n<tool_response>\n21\n</tool_response>\n<|im_end|>\n<|im_start|>assistant\n'
        '<think></think>\n21.<|im_end|>\n<|im_start|>user\nThanks<|im_end|>\n<|im_start|>assistant\n'
        '<think>\n'),
    "earlier_call_turn_thought_only": (
        '<|im_start|>system\n<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n'
        '<think></think>\n<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n'
        '<parameter=days>\n2\n</parameter>\n</function>\n</tool_call>\n<|im_end|>\n<|im_start|>user\n'
        '<tool_response>\n21\n</tool_response>\n<|im_end|>\n<|im_start|>user\nThanks<|im_end|>\n'),
    "later_system_turn": (
        '<|im_start|>system\nYou are a weather bot.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n'
        '<|im_start|>system\nAnswer in French.<|im_end|>\n<|im_start|>assistant\n'
        '<think></think>The answer is 4.<|im_end|>\n'),
    "tool_after_user_then_user": (
        '<|im_start|>system\n<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>user\n'
        '<tool_response>\nx\n</tool_response>\n<|im_end|>\n<|im_start|>user\ny<|im_end|>\n'),
    "unclosed_thought": (
        '<|im_start|>system\n<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n'
        '<think>\nno end<|im_end|>\n'),
    "empty_earlier_answer": (
        '<|im_start|>system\n<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n'
        '<think></think><|im_end|>\n<|im_start|>user\n?<|im_end|>\n'),
    "other_role": (
        '<|im_start|>system\n<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>ipython\n'
        'out<|im_end|>\n'),
}


@pytest.mark.parametrize("name", list(OFFICIAL_CASES))
def test_rendering_equals_the_official_template(tok, name):
    kwargs, expected = OFFICIAL_CASES[name], OFFICIAL_RENDERINGS[name]
    assert render_chat(**kwargs) == expected
    ids, mask = encode_chat(tok, **kwargs)  # and the ids are those of the official text
    assert ids == tok.encode(expected) and tok.decode(ids) == expected


def test_tool_result_first_opens_a_user_turn():
    # the one deviation: the official template opens no user turn for a tool message that comes first, which
    # leaves it inside the system turn's wake; ours opens one, as for a tool message anywhere else
    messages = [{"role": "tool", "content": "r"}, {"role": "user", "content": "q"}]
    assert render_chat(messages) == ("<|im_start|>system\n<|im_end|>\n<|im_start|>user\n<tool_response>\nr\n"
                                     "</tool_response>\n<|im_end|>\n<|im_start|>user\nq<|im_end|>\n")


TOOL_CHAT = OFFICIAL_CASES["tools_and_results"]["messages"]


# -----------------------------------------------------------------------------
# The assistant mask


def masked_spans(tok, ids, mask):
    """The decoded text of each run of mask == 1."""
    spans, run = [], []
    for token, m in zip(ids + [None], mask + [0]):
        if m:
            run.append(token)
        elif run:
            spans.append(tok.decode(run))
            run = []
    return spans


CONVERSATIONS = {  # name -> (messages, tools, thinking, the trained text of each assistant turn)
    "thinking": ([QUESTION, THOUGHT_ANSWER], None, True,
                 ["2+2 is 4.\n</think>\nThe answer is 4.<|im_end|>"]),
    "non_thinking": ([QUESTION, PLAIN_ANSWER], None, False, ["The answer is 4.<|im_end|>"]),
    # an earlier turn loses its thinking and is trained as a non-thinking answer: after <think></think>
    "multi_turn": ([QUESTION, THOUGHT_ANSWER, {"role": "user", "content": "Double it?"},
                    {"role": "assistant", "content": "<think>\n4*2 = 8\n</think>\n8"}], None, True,
                   ["\nThe answer is 4.<|im_end|>", "4*2 = 8\n</think>\n8<|im_end|>"]),
    "tools": (TOOL_CHAT, TOOLS, True, [
        "I should call the tool.\n</think>\n<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n"
        "</parameter>\n<parameter=days>\n2\n</parameter>\n</function>\n</tool_call>\n<|im_end|>",
        "21 and clear.\n</think>\nSunny, 21°C.<|im_end|>"]),
    # awkward starts for BPE next to a boundary: digits, punctuation, non-ASCII, a leading newline in the data
    "awkward": ([{"role": "user", "content": "12"},
                 {"role": "assistant", "content": "<think>\n\n...12!\n</think>\n\n12 é"}], None, True,
                ["\n...12!\n</think>\n\n12 é<|im_end|>"]),
}


@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_assistant_mask_covers_exactly_the_assistant_tokens(tok, name):
    messages, tools, thinking, trained = CONVERSATIONS[name]
    ids, mask = encode_chat(tok, messages, tools=tools, thinking=thinking)
    assert len(ids) == len(mask) and set(mask) == {0, 1}
    assert masked_spans(tok, ids, mask) == trained
    # per-segment tokenization equals tokenizing the whole rendering: no merge crossed a mask boundary
    assert ids == tok.encode(render_chat(messages, tools=tools, thinking=thinking))
    assert tok.decode(ids) == render_chat(messages, tools=tools, thinking=thinking)


@pytest.mark.parametrize("thinking", [True, False])
def test_sft_tokens_equal_prompt_plus_sampled_tokens(tok, thinking):
    # What SFT trains on is what the sampler sees: the generation prompt's ids, then the model's own tokens.
    messages, _, _, (trained,) = CONVERSATIONS["thinking" if thinking else "non_thinking"]
    ids, mask = encode_chat(tok, messages, thinking=thinking)
    prompt = encode_prompt(tok, messages[:-1], thinking=thinking)
    completion = tok.encode(trained)
    assert ids == prompt + completion + tok.encode("\n")
    assert mask == [0] * len(prompt) + [1] * len(completion) + [0]
    assert completion[-1] in tok.stop_token_ids


# -----------------------------------------------------------------------------
# Parsing responses


def test_parse_closed_thinking():
    out = parse_response("2+2 is 4.\n</think>\nThe answer is 4.<|im_end|>")
    assert out == dict(thinking="2+2 is 4.", answer="The answer is 4.", tool_calls=[], thinking_closed=True)
    # with the template's opener in front, and junk after the stop token
    assert parse_response("<think>\n2+2 is 4.\n</think>\nThe answer is 4.<|im_end|>\nextra") == out


def test_parse_unclosed_thinking():
    out = parse_response("Let me think about this for a long")
    assert out == dict(thinking="Let me think about this for a long", answer="", tool_calls=[],
                       thinking_closed=False)
    # an answer inside an unclosed thought is not an answer
    assert parse_response("The answer is 4.<|im_end|>")["answer"] == ""


def test_parse_non_thinking():
    out = parse_response("The answer is 4.<|im_end|>", thinking=False)
    assert out == dict(thinking=None, answer="The answer is 4.", tool_calls=[], thinking_closed=True)
    assert parse_response("<think></think>The answer is 4.", thinking=False) == out


def test_parse_tool_calls():
    text = ("Need the weather.\n</think>\nLet me check.\n<tool_call>\n<function=get_weather>\n<parameter=city>\n"
            "New York\n</parameter>\n<parameter=days>\n2\n</parameter>\n</function>\n</tool_call>\n"
            "<tool_call>\n<function=get_time>\n<parameter=zone>\nmulti\nline\n</parameter>\n</function>\n</tool_call>\n"
            "<|im_end|>")
    out = parse_response(text)
    assert out["thinking"] == "Need the weather." and out["answer"] == "Let me check." and out["thinking_closed"]
    assert out["tool_calls"] == [dict(name="get_weather", arguments={"city": "New York", "days": "2"}),
                                 dict(name="get_time", arguments={"zone": "multi\nline"})]
    # with the tools' schemas, values become the declared types
    assert parse_response(text, tools=TOOLS)["tool_calls"][0]["arguments"] == {"city": "New York", "days": 2}
    # a tool call written inside the thought is not a call
    assert parse_response("<tool_call>\n<function=f>\n</function>\n</tool_call>\n</think>\nno")["tool_calls"] == []


def test_parse_inverts_render(tok):
    # the rendered tool-calling turn parses back to its message
    ids, mask = encode_chat(tok, TOOL_CHAT[:3], tools=TOOLS)
    completion = tok.decode([t for t, m in zip(ids, mask) if m])
    out = parse_response(completion, tools=TOOLS)
    assert out["thinking"] == "I should call the tool." and out["answer"] == ""
    assert out["tool_calls"] == [dict(name="get_weather", arguments={"city": "Paris", "days": 2})]
