"""tasks/tools.py: the tool-calling verifier on hand-written cases, its schema checks, and the loader on rows in the
released NeMo-Gym format (fixtures written from NVIDIA-NeMo/Gym resources_servers/workplace_assistant)."""

import json

import pytest

import tasks

TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city.", "parameters": {
        "type": "object", "properties": {
            "city": {"type": "string"}, "days": {"type": "integer"},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"], "default": "celsius"},
            "hours": {"type": "array", "items": {"type": "integer"}},
            "where": {"type": "object", "properties": {"lat": {"type": "number"}, "lon": {"type": "number"}}}},
        "required": ["city", "days"]}}},
    {"name": "get_time", "parameters": {"type": "object", "properties": {"zone": {"type": "string"}},
                                        "required": ["zone"]}},  # the bare form works too
]
PARIS = {"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}
TOKYO = {"name": "get_time", "arguments": {"zone": "Asia/Tokyo"}}


def call(name, **arguments):
    """A call as the chat template writes it (values as text, objects and lists as JSON)."""
    text = f"<tool_call>\n<function={name}>\n"
    for key, value in arguments.items():
        text += f"<parameter={key}>\n{value if isinstance(value, str) else json.dumps(value)}\n</parameter>\n"
    return text + "</function>\n</tool_call>\n"


def grade(answer, *acceptable):
    example = tasks.example_from_row({"domain": "tool", "messages": [{"role": "user", "content": "q"}],
                                      "tools": TOOLS, "tool_calls": list(acceptable)})
    return tasks.reward(example, "<think>\nok\n</think>\n" + answer)


def test_the_expected_call_scores_1():
    assert grade(call("get_weather", city="Paris", days=2), [PARIS]) == 1.0
    assert grade("Let me look.\n" + call("get_weather", days=2, city="Paris"), [PARIS]) == 1.0  # prose before: fine


@pytest.mark.parametrize("answer, why", [
    (call("get_time", zone="Paris"), "another function of the tools"),
    (call("get_forecast", city="Paris", days=2), "a function not in the tools"),
    (call("get_weather", city="Paris"), "a required argument missing"),
    (call("get_weather", city="Paris", days=2, country="FR"), "an argument the function does not have"),
    (call("get_weather", city="Lyon", days=2), "a wrong value"),
    (call("get_weather", city="Paris", days='"2"'), "a number given as a string where the schema says integer"),
    (call("get_weather", city="Paris", days="two"), "a number that is not a number"),
    (call("get_weather", city="Paris", days=2, unit="fahrenheit"), "an optional argument not the expected one"),
    (call("get_weather", city="Paris", days=2) + call("get_time", zone="Asia/Tokyo"), "one call too many"),
    ("It is sunny in Paris.", "prose where a call is expected"),
    ("<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n<parameter=days>\n2\n</parameter>\n"
     "</tool_call>", "malformed markup: </function> missing"),
    (call("get_weather", city="Paris", days=2).replace("</tool_call>", ""), "malformed markup: never closed"),
    ("", "nothing"),
])
def test_wrong_calls_score_0(answer, why):
    assert grade(answer, [PARIS]) == 0.0, why


def test_values_compare_after_type_coercion():
    assert grade(call("get_weather", city="Paris", days="2.0"), [PARIS]) == 1.0   # numbers by value
    assert grade(call("get_weather", city="paris", days=2), [PARIS]) == 1.0      # BFCL: case-insensitive,
    new_york = {"name": "get_weather", "arguments": {"city": "New York", "days": 1}}
    assert grade(call("get_weather", city="new-york", days=1), [new_york]) == 1.0  # no spaces / hyphens / ...
    assert grade(call("get_weather", city="NewYork.", days=1), [new_york]) == 1.0
    assert grade(call("get_weather", city="New Jersey", days=1), [new_york]) == 0.0
    # lists in order, objects key by key, recursively and typed by the nested schema
    full = {"name": "get_weather", "arguments": {"city": "Oslo", "days": 1, "hours": [9, 12],
                                                 "where": {"lat": 59.9, "lon": 10.75}}}
    good = call("get_weather", city="Oslo", days=1, hours=[9, 12], where={"lon": 10.75, "lat": 59.9})
    assert grade(good, [full]) == 1.0
    assert grade(call("get_weather", city="Oslo", days=1, hours=[12, 9], where={"lat": 59.9, "lon": 10.75}),
                 [full]) == 0.0
    assert grade(call("get_weather", city="Oslo", days=1, hours=[9, 12], where={"lat": 59.9}), [full]) == 0.0
    assert grade(call("get_weather", city="Oslo", days=1, hours=[9, 12], where={"lat": "59.9", "lon": 10.75}),
                 [full]) == 0.0


def test_an_optional_argument_left_out_or_given_its_default_alike():
    expected = [{"name": "get_weather", "arguments": {"city": "Paris", "days": 2, "unit": "celsius"}}]
    assert grade(call("get_weather", city="Paris", days=2), expected) == 1.0
    assert grade(call("get_weather", city="Paris", days=2, unit="celsius"), [PARIS]) == 1.0
    assert grade(call("get_weather", city="Paris", days=2, unit="fahrenheit"), expected) == 0.0


def test_parallel_calls_in_any_order():
    both = [PARIS, TOKYO]
    assert grade(call("get_time", zone="Asia/Tokyo") + call("get_weather", city="Paris", days=2), both) == 1.0
    assert grade(call("get_weather", city="Paris", days=2) + call("get_time", zone="Asia/Tokyo"), both) == 1.0
    assert grade(call("get_time", zone="Asia/Tokyo"), both) == 0.0                              # one too few
    assert grade(call("get_time", zone="Asia/Tokyo") * 2 + call("get_weather", city="Paris", days=2), both) == 0.0
    twice = [PARIS, {"name": "get_weather", "arguments": {"city": "Rome", "days": 2}}]
    assert grade(call("get_weather", city="Paris", days=2) * 2, twice) == 0.0  # each expected call matched once


def test_prose_answers_and_several_acceptable_answers():
    assert grade("I cannot help with that.", []) == 1.0
    assert grade(call("get_weather", city="Paris", days=2), []) == 0.0  # a call where prose is expected
    assert grade("", []) == 0.0
    assert grade(call("get_weather", city="Paris", days=2), [TOKYO], [PARIS]) == 1.0  # any acceptable answer
    assert grade("No call needed.", [PARIS], []) == 1.0
    example = tasks.example_from_row({"domain": "tool", "messages": [{"role": "user", "content": "q"}],
                                      "tools": TOOLS, "tool_calls": [[PARIS]]})
    assert tasks.reward(example, "<think>\nnever closed " + call("get_weather", city="Paris", days=2)) == 0.0
    # a call written inside the thought is not a call
    assert tasks.reward(example, "<think>\n" + call("get_weather", city="Paris", days=2) + "</think>\nDone.") == 0.0


@pytest.mark.parametrize("change, field", [
    ({"tools": []}, "tools"),
    ({"tools": [{"description": "no name"}]}, "tools[0]"),
    ({"tool_calls": [PARIS]}, "tool_calls"),                                            # not a list of answers
    ({"tool_calls": [[{"name": "get_forecast", "arguments": {}}]]}, "tool_calls[0][0]"),  # not one of the tools
    ({"tool_calls": [[{"name": "get_weather", "arguments": "{city: Paris}"}]]}, "tool_calls[0][0].arguments"),
    ({"tool_calls": [[{"name": "get_weather", "arguments": {"town": "Paris"}}]]}, "tool_calls[0][0].arguments"),
])
def test_malformed_examples_name_the_field(change, field):
    row = dict({"domain": "tool", "messages": [{"role": "user", "content": "q"}], "tools": TOOLS,
                "tool_calls": [[PARIS]]}, **change)
    with pytest.raises(tasks.ExampleError) as error:
        tasks.example_from_row(row, "rows.jsonl:3")
    assert error.value.field == field and error.value.where == "rows.jsonl:3"


def test_openai_form_calls_are_normalised():
    example = tasks.example_from_row({"domain": "tool", "messages": [{"role": "user", "content": "q"}], "tools": TOOLS,
                                      "tool_calls": [[{"type": "function", "function": {
                                          "name": "get_weather", "arguments": '{"city": "Paris", "days": 2}'}}]]})
    assert example["tool_calls"] == [[PARIS]]


# -----------------------------------------------------------------------------
# The released rows. Nemotron-Cascade-2-RL-data's tool calling is NeMo-Gym's workplace_assistant environment: a row
# is {"id", "responses_create_params": {"input": [...], "tools": [{"type": "function", "name", "description",
# "parameters", "strict"}], "parallel_tool_calls", "temperature"}, "ground_truth": [{"name", "arguments": "<JSON>"}],
# "category", "environment_name": "workplace_assistant", "agent_ref": {"name": "workplace_assistant_simple_agent"}}.
# NeMo-Gym grades it by running the policy's calls and the ground truth against live databases.

WORKPLACE_TOOLS = [
    {"type": "function", "name": "email_send_email", "description": "Sends an email to the specified recipient.",
     "parameters": {"type": "object", "properties": {
         "recipient": {"type": "string", "description": "Email address of the recipient"},
         "subject": {"type": "string", "description": "Subject line of the email"},
         "body": {"type": "string", "description": "Body content of the email"}},
         "required": ["recipient", "subject", "body"], "additionalProperties": False}, "strict": False},
    {"type": "function", "name": "email_reply_email", "description": "Replies to an email by its ID.",
     "parameters": {"type": "object", "properties": {
         "email_id": {"type": "string", "description": "Unique ID of the email to be replied"},
         "body": {"type": "string", "description": "Body content of the email"}},
         "required": ["email_id", "body"], "additionalProperties": False}, "strict": False},
]
SYSTEM = ("Today's date is Thursday, 2023-11-30 and the current time is 23:59:00. Remember the current date and time "
          "when answering queries. Meetings must not start before 9am or end after 6pm.")


def workplace_row(prompt, ground_truth):
    return {"id": 7, "responses_create_params": {
                "input": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": prompt}],
                "tools": WORKPLACE_TOOLS, "parallel_tool_calls": False, "temperature": 1.0},
            "ground_truth": ground_truth, "category": "workplace_assistant_email",
            "environment_name": "workplace_assistant",
            "agent_ref": {"type": "responses_api_agents", "name": "workplace_assistant_simple_agent"}}


SEND = workplace_row("Send an email to nadia.moreau@atlas.com with the subject 'Q4 plan' saying 'Draft attached.'",
                     [{"name": "email_send_email", "arguments": json.dumps(
                         {"recipient": "nadia.moreau@atlas.com", "subject": "Q4 plan", "body": "Draft attached."})}])
REPLY = workplace_row(  # the email's id comes from a search the environment answers: multi-step
    "Reply to carlos's last email about 'Task Update on Develop prototype' with 'Thanks, will do.'",
    [{"name": "email_reply_email", "arguments": '{"email_id": "00000057", "body": "Thanks, will do."}'}])
NO_CHANGE = workplace_row("How many emails did I get from carlos this week?", [])  # graded on database state


def test_released_tool_rows_load_and_grade(tmp_path, capsys):
    path = tmp_path / "multi-domain.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in (SEND, REPLY, NO_CHANGE)))
    examples = tasks.load_examples(path)
    out = capsys.readouterr().out
    assert "kept 1, skipped 2" in out
    assert "1 tool-calling that needs a live environment (workplace_assistant_simple_agent)" in out
    assert "1 tool-calling without ground-truth calls (workplace_assistant_simple_agent)" in out

    (example,) = examples
    assert example["domain"] == "tool" and [m["role"] for m in example["messages"]] == ["system", "user"]
    # the Responses API's flat tools become the chat form the template renders; nothing else changes
    assert example["tools"][0] == {"type": "function", "function": {k: v for k, v in WORKPLACE_TOOLS[0].items()
                                                                    if k != "type"}}
    assert example["tool_calls"] == [[{"name": "email_send_email", "arguments": {
        "recipient": "nadia.moreau@atlas.com", "subject": "Q4 plan", "body": "Draft attached."}}]]
    good = call("email_send_email", recipient="nadia.moreau@atlas.com", subject="Q4 plan", body="Draft attached.")
    assert tasks.reward(example, "<think>\nSend it.\n</think>\n" + good) == 1.0
    assert tasks.reward(example, "<think>\nSend it.\n</think>\n" + good.replace("Q4 plan", "Q3 plan")) == 0.0
    assert tasks.score_responses(examples, [good], thinking=False)["domains"]["tool"]["pass@1"] == 1.0


def test_released_rows_with_tool_results_in_the_input():
    # Responses-API input items: a function_call and its function_call_output become an assistant turn with the
    # call and a tool message, as the chat template renders them
    row = workplace_row("Find Nadia's address and send her 'Hi'.", [{"name": "email_send_email", "arguments":
                        json.dumps({"recipient": "nadia.moreau@atlas.com", "subject": "Hi", "body": "Hi"})}])
    row["responses_create_params"]["input"] += [
        {"type": "function_call", "name": "company_directory_find_email_address", "arguments": '{"name": "Nadia"}',
         "call_id": "c1"},
        {"type": "function_call_output", "call_id": "c1", "output": '["nadia.moreau@atlas.com"]'}]
    example = tasks.example_from_row(row, "rows.jsonl:1")
    assert [m["role"] for m in example["messages"]] == ["system", "user", "assistant", "tool"]
    assert example["messages"][2]["tool_calls"] == [{"name": "company_directory_find_email_address",
                                                     "arguments": '{"name": "Nadia"}'}]
    assert example["messages"][3]["content"] == '["nadia.moreau@atlas.com"]'
    assert example["tool_calls"][0][0]["arguments"]["recipient"] == "nadia.moreau@atlas.com"


def test_malformed_ground_truth_names_the_row():
    row = workplace_row("Send it.", [{"name": "email_send_email", "arguments": "{recipient:"}])
    with pytest.raises(tasks.ExampleError) as error:
        tasks.example_from_row(row, "multi-domain.jsonl:12")
    assert error.value.where == "multi-domain.jsonl:12" and error.value.field == "ground_truth[0].arguments"
    with pytest.raises(tasks.ExampleError, match="ground_truth"):
        tasks.example_from_row(workplace_row("Send it.", "not json"), "multi-domain.jsonl:13")
