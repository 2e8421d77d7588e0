"""
The tokenizer and the Nemotron-Cascade 2 chat template.

Two halves:
1) Tokenizer: a thin wrapper over HF `tokenizers` that loads any `tokenizer.json` (the real Nemotron one, 131072
   tokens) or trains the tiny byte-level BPE that the CPU pipeline uses (data/tokenizer.json, 2048 tokens).
2) The chat template, written in Python rather than Jinja so it can return a loss mask next to the token ids:
   render_chat (text), encode_chat (ids + assistant mask, what SFT trains on), encode_prompt (ids ending in the
   generation prompt, what RL and the sampler start from) and parse_response (thinking / answer / tool calls,
   what the verifiers grade).

One conversation, rendered in thinking mode (every special token is a single token):

    <|im_start|>system
    You are helpful.<|im_end|>
    <|im_start|>user
    What is 2+2?<|im_end|>
    <|im_start|>assistant
    <think>
    2+2 is 4.
    </think>
    The answer is 4.<|im_end|>

The template supplies `<|im_start|>assistant\n<think>\n` (thinking) or `<|im_start|>assistant\n<think></think>`
(non-thinking); the model writes the rest of the turn, through `<|im_end|>`. That rest is exactly what the
assistant mask marks.
"""

import json
import re
from pathlib import Path
from typing import Iterable

from tokenizers import AddedToken, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

# -----------------------------------------------------------------------------
# Special tokens. Each one is a single token that BPE never splits or merges, and that `encode` recognises
# when it appears in text. The tiny tokenizer puts them at fixed low ids (the order of this list). The first
# three match Nemotron 3 Nano (<unk> 0 = pad, <s> 1 = bos, </s> 2 = eos); there <|im_end|> is 11, which its
# generation_config lists as a second eos. Every one of them is marked special, so decode(skip_special_tokens=True)
# drops the <think>/<tool_call> tags too: keep them when the text is to be parsed.
UNK, BOS, EOS = "<unk>", "<s>", "</s>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"
TOOL_RESPONSE_OPEN, TOOL_RESPONSE_CLOSE = "<tool_response>", "</tool_response>"
TOOLS_OPEN, TOOLS_CLOSE = "<tools>", "</tools>"
SPECIAL_TOKENS = [
    UNK, BOS, EOS,                                # 0, 1, 2: as in Nemotron (pad_token_id 0 is <unk>)
    IM_START, IM_END,                             # 3, 4: ChatML turn delimiters; <|im_end|> ends every turn
    THINK_OPEN, THINK_CLOSE,                      # 5, 6
    TOOL_CALL_OPEN, TOOL_CALL_CLOSE,              # 7, 8
    TOOL_RESPONSE_OPEN, TOOL_RESPONSE_CLOSE,      # 9, 10
    TOOLS_OPEN, TOOLS_CLOSE,                      # 11, 12
]

DEFAULT_TOKENIZER_PATH = Path(__file__).parent / "data" / "tokenizer.json"

# -----------------------------------------------------------------------------
# The tokenizer


class Tokenizer:
    """An HF `tokenizers.Tokenizer` plus the ids this project needs: bos, eos, pad and the stop tokens."""

    def __init__(self, tokenizer: HFTokenizer, bos_token=BOS, eos_token=EOS, pad_token=UNK):
        self.tokenizer = tokenizer
        self.bos_token, self.eos_token, self.pad_token = bos_token, eos_token, pad_token
        self.bos_id = tokenizer.token_to_id(bos_token) if bos_token else None
        self.eos_id = tokenizer.token_to_id(eos_token) if eos_token else None
        self.pad_id = tokenizer.token_to_id(pad_token) if pad_token else None
        if self.pad_id is None:  # no pad token: any id works, padded positions are masked out anyway
            self.pad_id = self.eos_id if self.eos_id is not None else 0

    @classmethod
    def from_file(cls, path) -> "Tokenizer":
        """An HF tokenizer.json, with bos/eos/pad taken to be <s>, </s>, <unk> (the tiny tokenizer's)."""
        return cls(HFTokenizer.from_file(str(path)))

    @classmethod
    def from_pretrained(cls, directory) -> "Tokenizer":
        """An HF model directory: tokenizer.json, and bos/eos/pad from tokenizer_config.json or
        special_tokens_map.json where present (the config wins). The Nemotron 3 Nano release names
        <|im_end|> as its eos there; stop_token_ids covers both <|im_end|> and </s> either way."""
        directory = Path(directory)
        names = {"bos_token": BOS, "eos_token": EOS, "pad_token": UNK}
        for filename in ("special_tokens_map.json", "tokenizer_config.json"):
            path = directory / filename
            if path.exists():
                config = json.loads(path.read_text())
                for key in names:
                    value = config.get(key)
                    if isinstance(value, dict):  # {"content": "<s>", "lstrip": false, ...}
                        value = value.get("content")
                    if value:
                        names[key] = value
        return cls(HFTokenizer.from_file(str(directory / "tokenizer.json")), **names)

    def save(self, path):
        """Write tokenizer.json. Byte-identical for identical tokenizers (vocab and merges are stored in id order)."""
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save(str(path), pretty=True)

    def save_pretrained(self, directory):
        """Write tokenizer.json and a small tokenizer_config.json, enough for transformers' AutoTokenizer."""
        directory = Path(directory)
        self.save(directory / "tokenizer.json")
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": self.bos_token, "eos_token": self.eos_token, "pad_token": self.pad_token,
            "unk_token": UNK if self.tokenizer.token_to_id(UNK) is not None else None,
            # chat prompts carry no <s>: the template starts with <|im_start|>, as Nemotron's does
            "add_bos_token": False, "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
        }
        (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        # Special tokens written in the text become their single ids (tokenizers splits the text on them before
        # BPE). So a user message that contains "<|im_end|>" does end its turn: fine for a reference, but
        # sanitise untrusted text before a real deployment. No <s> is added.
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        # Keep special tokens by default: parse_response needs the <think>/<tool_call> tags, which count as special.
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_id(self, token: str) -> int:
        token_id = self.tokenizer.token_to_id(token)
        if token_id is None:
            raise KeyError(f"{token!r} is not a single token of this tokenizer")
        return token_id

    @property
    def stop_token_ids(self) -> list[int]:
        """Ids that end a generation: eos and <|im_end|> (the end of an assistant turn), plus </s> where the
        configured eos is something else (Nemotron's generation_config stops on both 2 and 11)."""
        ids = [self.eos_id] + [self.tokenizer.token_to_id(t) for t in (IM_END, EOS)]
        return sorted({i for i in ids if i is not None})


def load_tokenizer(path=DEFAULT_TOKENIZER_PATH) -> Tokenizer:
    """A tokenizer.json file or an HF model directory; the tiny shipped tokenizer by default."""
    path = Path(path)
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"{file}: no such tokenizer file")
    try:
        return Tokenizer.from_pretrained(path) if path.is_dir() else Tokenizer.from_file(path)
    except Exception as e:  # the tokenizers library raises a bare Exception for a malformed file
        raise ValueError(f"{file}: not a readable tokenizer ({str(e).splitlines()[0][:200]})") from None


def train_bpe(texts: Iterable[str], vocab_size: int = 2048) -> Tokenizer:
    """Train a byte-level BPE tokenizer with SPECIAL_TOKENS at ids 0..12. Deterministic (tested): the same texts give a
    byte-identical tokenizer.json (the trainer breaks count ties by pair, and the 256-byte alphabet is fixed).
    The vocabulary has exactly vocab_size tokens unless the texts run out of pairs to merge first."""
    tokenizer = HFTokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        # one token per digit: a tiny model learns arithmetic far more easily than with merged digit strings
        pre_tokenizers.Digits(individual_digits=True),
        # GPT-2's split into words / numbers / punctuation / whitespace, then bytes -> printable characters,
        # so every string is encodable and no merge ever crosses a word boundary
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, seen in the texts or not
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    return Tokenizer(tokenizer)


# -----------------------------------------------------------------------------
# The chat template
#
# The chat_template of NVIDIA-Nemotron-3-Nano-30B-A3B, byte for byte (tests/test_tokenizer.py keeps its renderings
# of a spread of conversations, made with jinja2 as transformers' apply_chat_template renders it, and compares).
# Nemotron-Cascade-2-30B-A3B is post-trained from the Nano base and uses the same format (ChatML, <think>, XML tool
# calls; DESIGN.md section 6). A model trained here and served by vLLM or transformers with the official template
# sees the prompts it was trained on. Messages are dicts with a "role" (system, user, assistant, tool) and
# "content"; an assistant message may carry its thinking as "reasoning_content" or inline as
# "<think>...</think>answer" (the Cascade-2 SFT data), and "tool_calls" as [{"name", "arguments": {...}}] or in
# the OpenAI form [{"type": "function", "function": {"name", "arguments"}}]. What the official template does:
# - An assistant turn is rendered as written (content stripped at both ends), with <think></think> in front when
#   it has no thinking. Assistant turns before the last user message keep only the text after their </think>,
#   as <think></think> + that text (so usually "<think></think>\nanswer"). Tool results are not user messages,
#   so within one agentic exchange (call, result, call, ...) every step keeps its thinking.
# - `thinking` (enable_thinking) only changes the generation prompt: <think>\n, or <think></think> without.
# - Consecutive tool results share one user turn.
# Where we differ, on purpose:
# - A tool message at the very start (after any system message) opens a user turn; the official template opens
#   none there (it tests `loop.previtem`, which is undefined for the first message), which is a bug.
# - Tool call arguments given as a JSON string (as the OpenAI API sends them) are parsed; the official template
#   needs a dict (it fails on a string).
#
# Which assistant turns are trained: all of them, as rendered (SFT data is mostly single-turn, and this is the
# usual choice, as with the {% generation %} markers of HF assistant masks). Only the text after the opener is
# trained: the model never writes `<|im_start|>assistant\n`, nor the `<think>\n` / `<think></think>` at the start
# of the turn, which the generation prompt supplies, but it must learn to write `<|im_end|>` to stop. An earlier
# turn stripped of its thinking is so trained as a non-thinking answer, which is what the model sees there.

# The official template's text after </tools>, verbatim.
TOOLS_REMINDER = (
    "\n\nIf you choose to call a function ONLY reply in the following format with NO suffix:\n\n"
    f"{TOOL_CALL_OPEN}\n<function=example_function_name>\n<parameter=example_parameter_1>\nvalue_1\n</parameter>\n"
    "<parameter=example_parameter_2>\nThis is the value for the second parameter\nthat can span\nmultiple lines\n"
    f"</parameter>\n</function>\n{TOOL_CALL_CLOSE}\n\n<IMPORTANT>\nReminder:\n"
    f"- Function calls MUST follow the specified format: an inner <function=...></function> block must be nested "
    f"within {TOOL_CALL_OPEN}{TOOL_CALL_CLOSE} XML tags\n"
    "- Required parameters MUST be specified\n"
    "- You may provide optional reasoning for your function call in natural language BEFORE the function call, "
    "but NOT after\n"
    "- If there is no function call available, answer the question like normal with your current knowledge and do "
    "not tell the user about function calls\n</IMPORTANT>")


def _to_text(value) -> str:
    # How the template prints a value: JSON for objects and lists (its tojson: no key sorting, no ASCII escaping),
    # Python's str() for the rest (Jinja's `| string`: True prints as "True", None as "None").
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value, ensure_ascii=False)
    return str(value)


def _render_tools(tools: list[dict]) -> str:
    """The tool list for the system prompt, in Nemotron 3's XML layout, and the reminder after it."""
    def extra_keys(fields, handled: tuple) -> str:
        if not isinstance(fields, dict):
            return ""
        return "".join(f"\n<{k}>{_to_text(v)}</{k}>" for k, v in fields.items() if k not in handled)

    text = f"# Tools\n\nYou have access to the following functions:\n\n{TOOLS_OPEN}"
    for tool in tools:
        fn = tool.get("function", tool)  # OpenAI form {"type": "function", "function": {...}} or the bare function
        text += f"\n<function>\n<name>{fn['name']}</name>"
        if "description" in fn:
            text += f"\n<description>{str(fn['description']).strip()}</description>"
        text += "\n<parameters>"
        parameters = fn.get("parameters")
        properties = parameters.get("properties") if isinstance(parameters, dict) else None
        for name, fields in (properties.items() if isinstance(properties, dict) else []):
            text += f"\n<parameter>\n<name>{name}</name>"
            if "type" in fields:
                text += f"\n<type>{fields['type']}</type>"
            if "description" in fields:
                text += f"\n<description>{str(fields['description']).strip()}</description>"
            if "enum" in fields:
                text += f"\n<enum>{json.dumps(fields['enum'], ensure_ascii=False)}</enum>"
            text += extra_keys(fields, ("name", "type", "description", "enum"))
            text += "\n</parameter>"
        text += extra_keys(parameters, ("type", "properties", "required"))
        if isinstance(parameters, dict) and "required" in parameters:
            text += f"\n<required>{json.dumps(parameters['required'], ensure_ascii=False)}</required>"
        text += "\n</parameters>"
        text += extra_keys(fn, ("type", "name", "description", "parameters"))
        text += "\n</function>"
    return text + f"\n{TOOLS_CLOSE}" + TOOLS_REMINDER


def _render_tool_call(call: dict) -> str:
    call = call.get("function", call)
    arguments = call.get("arguments") or {}
    if isinstance(arguments, str):  # the OpenAI API sends arguments as a JSON string
        arguments = json.loads(arguments)
    text = f"{TOOL_CALL_OPEN}\n<function={call['name']}>\n"
    for name, value in arguments.items():
        text += f"<parameter={name}>\n{_to_text(value)}\n</parameter>\n"
    return text + f"</function>\n{TOOL_CALL_CLOSE}\n"


def _assistant_text(message: dict, earlier: bool) -> str:
    """An assistant turn's text between `<|im_start|>assistant\\n` and `<|im_end|>`, as the template writes it.
    `earlier`: the turn comes before the last user message, and keeps only what follows its thinking."""
    content = message.get("content") or ""
    reasoning = message.get("reasoning_content")
    if isinstance(reasoning, str) and reasoning.strip():
        content = f"{THINK_OPEN}\n{reasoning}\n{THINK_CLOSE}\n{content}"
    elif isinstance(content, str) and THINK_OPEN not in content and THINK_CLOSE not in content:
        content = f"{THINK_OPEN}{THINK_CLOSE}{content}"
    calls = message.get("tool_calls") or []
    if not calls:
        content = str(content)
        if earlier and THINK_OPEN in content and THINK_CLOSE in content:
            content = THINK_OPEN + THINK_CLOSE + content.split(THINK_CLOSE)[-1]
        return content.strip()
    if not isinstance(content, str) or not content.strip():
        text = THINK_OPEN + THINK_CLOSE
    elif not earlier:
        text = content.strip() + "\n"
    else:  # the text after the last </think>; or, for a thought that never closes, the text before it
        if THINK_CLOSE in content:
            content = content.split(THINK_CLOSE)[-1]
        elif THINK_OPEN in content:
            content = content.split(THINK_OPEN)[0]
        text = THINK_OPEN + THINK_CLOSE + content.strip() + "\n"
    return text + "".join(_render_tool_call(call) for call in calls)


def _chat_segments(messages, tools=None, thinking=True, add_generation_prompt=False) -> list[tuple[str, bool]]:
    """The rendered conversation as (text, trained) pieces, the one source of both render_chat and encode_chat."""
    segments = []
    def prompt(text): segments.append((text, False))
    def target(text): segments.append((text, True))

    messages = list(messages)
    system = ""
    if messages and messages[0]["role"] == "system":
        system, messages = messages[0]["content"], messages[1:]
    if tools:
        system += ("\n\n" if system else "") + _render_tools(tools)
    prompt(f"{IM_START}system\n{system}{IM_END}\n")  # always there, even when empty

    last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=-1)
    for i, message in enumerate(messages):
        role = message["role"]
        if role == "assistant":
            text = _assistant_text(message, earlier=i < last_user)
            # the opener the generation prompt supplies is not trained; the rest of the turn is
            openers = (f"{THINK_OPEN}\n", THINK_OPEN + THINK_CLOSE, THINK_OPEN)
            opener = next((o for o in openers if text.startswith(o)), "")
            prompt(f"{IM_START}assistant\n{opener}")
            target(f"{text[len(opener):]}{IM_END}")
            prompt("\n")
        elif role == "tool":
            if i == 0 or messages[i - 1]["role"] != "tool":  # consecutive tool results share one user turn
                prompt(f"{IM_START}user\n")
            prompt(f"{TOOL_RESPONSE_OPEN}\n{message['content']}\n{TOOL_RESPONSE_CLOSE}\n")
            if i == len(messages) - 1 or messages[i + 1]["role"] != "tool":
                prompt(f"{IM_END}\n")
        else:  # user, a later system message, or any other role
            prompt(f"{IM_START}{role}\n{message['content']}{IM_END}\n")

    if add_generation_prompt:
        prompt(f"{IM_START}assistant\n" + (f"{THINK_OPEN}\n" if thinking else THINK_OPEN + THINK_CLOSE))
    return segments


def render_chat(messages, tools=None, thinking=True, add_generation_prompt=False) -> str:
    """The conversation as text, in the Nemotron-Cascade 2 chat format."""
    return "".join(text for text, _ in _chat_segments(messages, tools, thinking, add_generation_prompt))


def encode_chat(tokenizer: Tokenizer, messages, tools=None, thinking=True,
                add_generation_prompt=False) -> tuple[list[int], list[int]]:
    """Token ids of the rendered conversation and an assistant mask of the same length: 1 on the tokens the
    model must learn to write (each assistant turn after its opener, through <|im_end|>), 0 elsewhere.

    Each run of trained / untrained text is tokenized on its own, so no BPE merge crosses a mask boundary.
    Every boundary sits next to a special token or after the "\n" of "<think>\n", which the pre-tokenizer keeps
    apart from the stripped text after it, so the ids equal tokenizer.encode(render_chat(...)) (tested). They also
    equal what the sampler sees: the generation prompt tokenized, then the model's tokens after it."""
    runs = []  # neighbouring pieces with the same flag, joined
    for text, trained in _chat_segments(messages, tools, thinking, add_generation_prompt):
        if runs and runs[-1][1] == trained:
            runs[-1][0] += text
        else:
            runs.append([text, trained])
    ids, mask = [], []
    for text, trained in runs:
        run_ids = tokenizer.encode(text)
        ids += run_ids
        mask += [int(trained)] * len(run_ids)
    return ids, mask


def encode_prompt(tokenizer: Tokenizer, messages, tools=None, thinking=True) -> list[int]:
    """Token ids of a prompt ending in the generation prompt: what RL rollouts and the sampler start from."""
    return encode_chat(tokenizer, messages, tools, thinking, add_generation_prompt=True)[0]


def encode_reply(tokenizer: Tokenizer, observations, thinking=True) -> list[int]:
    """An environment's reply to an assistant turn, as token ids that follow that turn's <|im_end|>: what the chat
    template renders after it for these tool results (one user turn of <tool_response> blocks) and the next
    generation prompt. A multi-turn rollout appends these to the sampled tokens, so the token stream equals the
    template's rendering of the whole episode (tests/test_sample.py). Only "tool" messages: a user message would
    make the template drop the thinking of the earlier assistant turns, which the rollout's cache still holds."""
    if not observations or any(m.get("role") != "tool" for m in observations):
        raise ValueError(f"an environment's reply must be one or more 'tool' messages, got {observations!r:.120}")
    head = [{"role": "user", "content": ""}, {"role": "assistant", "content": ""}]
    before = render_chat(head)
    full = render_chat(head + list(observations), thinking=thinking, add_generation_prompt=True)
    assert full.startswith(before) and before.endswith(IM_END + "\n")
    return tokenizer.encode("\n" + full[len(before):])


_TOOL_CALL_RE = re.compile(
    re.escape(TOOL_CALL_OPEN) + r"\s*<function=([^>\n]+)>(.*?)</function>\s*" + re.escape(TOOL_CALL_CLOSE), re.S)
_PARAMETER_RE = re.compile(r"<parameter=([^>\n]+)>(.*?)</parameter>", re.S)


def _parse_value(value: str, schema_type):
    """A parameter value is text; convert it where the tool's schema says it is not a string."""
    if schema_type in ("integer", "number", "boolean", "object", "array", "null"):
        if schema_type == "boolean" and value in ("True", "False"):  # how the template prints Python bools
            return value == "True"
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            pass
    return value


def parse_response(text: str, thinking: bool = True, tools=None) -> dict:
    """Split a generated assistant turn into thinking, answer and tool calls.

    `text` is what the model wrote after the generation prompt, decoded with special tokens kept (the tags are
    special tokens); it may also start with the template's opener (<think> or <think></think>). Everything from
    the first stop token (<|im_end|>, </s>) on is ignored. In thinking mode a response that never writes
    </think> has thinking_closed=False and an empty answer: the verifiers grade only the text after </think>.
    Tool call arguments are strings, converted to numbers / booleans / JSON where `tools` gives their schema."""
    for stop in (IM_END, EOS):
        text = text.split(stop, 1)[0]
    if text.lstrip().startswith(THINK_OPEN):  # the response includes the template's opener
        text, thinking = text.lstrip()[len(THINK_OPEN):], True
    if thinking:
        if THINK_CLOSE not in text:
            return dict(thinking=text.strip() or None, answer="", tool_calls=[], thinking_closed=False)
        thought, _, text = text.partition(THINK_CLOSE)
        thought = thought.strip() or None
    else:
        thought = None

    schema_types = {}  # (function, parameter) -> JSON schema type
    for tool in tools or []:
        fn = tool.get("function", tool)
        for name, fields in ((fn.get("parameters") or {}).get("properties") or {}).items():
            schema_types[fn["name"], name] = fields.get("type")
    tool_calls = []
    for match in _TOOL_CALL_RE.finditer(text):
        name = match.group(1).strip()
        arguments = {}
        for parameter in _PARAMETER_RE.finditer(match.group(2)):
            key, value = parameter.group(1).strip(), parameter.group(2)
            value = value.removeprefix("\n").removesuffix("\n")  # the template puts the value on its own lines
            arguments[key] = _parse_value(value, schema_types.get((name, key)))
        tool_calls.append(dict(name=name, arguments=arguments))
    answer = _TOOL_CALL_RE.sub("", text).strip()
    return dict(thinking=thought, answer=answer, tool_calls=tool_calls, thinking_closed=True)
